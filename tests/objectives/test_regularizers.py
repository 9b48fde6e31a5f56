import math

import pytest
import torch

from dmoe_train.objectives.regularizers import (
    CoresetRegularizer,
    expected_union,
    load_balance_loss,
    perplexity,
    router_z_loss,
)
from dmoe_train.routing import Routing


def test_expected_union_by_hand():
    p = torch.tensor([[0.5, 0.0, 1.0 - 1e-6], [0.5, 0.2, 0.0]])  # 2 tokens, 3 experts
    # e0: 1 - .5 * .5 = .75; e1: 1 - .8 = .2; e2: ~1
    assert float(expected_union(torch.log1p(-p))) == pytest.approx(0.75 + 0.2 + 1.0, abs=1e-5)


def test_perplexity_of_uniform_and_peaked():
    assert float(perplexity(torch.full((3, 8), 0.5))) == pytest.approx(8.0, rel=1e-5)
    peaked = torch.zeros(3, 8)
    peaked[:, 2] = 1.0
    assert float(perplexity(peaked)) == pytest.approx(1.0, rel=1e-4)
    half = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    assert float(perplexity(half)) == pytest.approx(math.exp(math.log(2)), rel=1e-5)


@pytest.mark.parametrize("kind", ["union", "entropy"])
def test_regularizer_is_differentiable_and_shared_routing_is_smaller(kind):
    reg = CoresetRegularizer(kind, 1.0)
    shared = torch.full((1, 8, 16), 0.01)
    shared[..., :2] = 0.99  # every token prefers experts 0 and 1
    spread = torch.full((1, 8, 16), 0.01)
    spread[0, torch.arange(8), torch.arange(8) * 2] = 0.99  # every token its own experts
    spread[0, torch.arange(8), torch.arange(8) * 2 + 1] = torch.linspace(0.6, 0.95, 8)
    sizes = []
    for scores in (shared, spread):
        logits = torch.logit(scores).requires_grad_()
        routing = Routing(scores.new_zeros(1, 8, 2).long(), scores, scores, logits=logits)
        size = reg.size([routing], 8, 2)
        size.backward()
        assert logits.grad.abs().sum() > 0
        sizes.append(size.item())
    assert sizes[0] < sizes[1]


def test_confident_tokens_keep_a_finite_gradient():
    logits = torch.full((1, 8, 16), -9.0)
    logits[..., 3] = 30.0  # saturated: p_te rounds to 1 in fp32
    logits.requires_grad_()
    CoresetRegularizer("union").size([Routing(None, None, None, logits=logits)], 8, 4).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("score_function", ["sigmoid", "softmax"])
def test_the_soft_distribution_is_the_softmax_of_the_routers_own_logits(score_function):
    """LLaDA-MoE's router scores by softmax: logit(softmax(z)) is not z, so the distribution is
    taken from the logits, never recovered from the scores (it was, before)."""
    logits = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(0)) * 3
    scores = logits.sigmoid() if score_function == "sigmoid" else logits.softmax(-1)
    routing = Routing(None, None, scores, logits=logits)
    by_hand = expected_union(4 * torch.log1p(-logits.softmax(-1))).mean()
    size = CoresetRegularizer("union").size([routing], 8, 4)
    assert float(size) == pytest.approx(float(by_hand), rel=1e-5)


def test_none_regularizer_is_zero_and_bad_kind_rejected():
    logits = torch.rand(1, 4, 8)
    none = CoresetRegularizer("none", 0.0).size([Routing(None, None, None, logits=logits)], 4, 2)
    assert float(none) == 0
    with pytest.raises(ValueError, match="^kind='bogus'"):
        CoresetRegularizer("bogus")


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    r = Routing(None, None, None, logits=logits)
    expected = logits.logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(router_z_loss([r, r]), expected)


def test_load_balance_loss_is_switch_transformers_by_hand():
    # 4 experts, top-1; uniform probabilities: E * sum_e f_e * 1/4 = 1 whatever the choices
    ids = torch.tensor([[[0], [1], [1], [-1]]])  # the last slot empty: not counted
    uniform = Routing(ids, torch.ones(1, 4, 1), torch.zeros(1, 4, 4), logits=torch.zeros(1, 4, 4))
    torch.testing.assert_close(load_balance_loss([uniform], 4), torch.tensor(1.0))
    # every token sure of expert 0 and sent there: E * 1 * ~1 = 4 (collapse costs E times more)
    logits = torch.tensor([20.0, 0, 0, 0]).expand(1, 3, 4)
    collapsed = Routing(
        torch.zeros(1, 3, 1, dtype=torch.long), torch.ones(1, 3, 1), logits, logits=logits
    )
    torch.testing.assert_close(
        load_balance_loss([collapsed], 4), torch.tensor(4.0), atol=1e-6, rtol=0
    )
    # f = (1/3, 2/3, 0, 0), P = softmax([0, ln 2, 0, 0]) = (1/5, 2/5, 1/5, 1/5): 4 * (1/15 + 4/15)
    logits = torch.tensor([0.0, math.log(2), 0, 0]).expand(1, 3, 4)
    mixed = Routing(torch.tensor([[[0], [1], [1]]]), torch.ones(1, 3, 1), logits, logits=logits)
    torch.testing.assert_close(
        load_balance_loss([mixed, uniform], 4), torch.tensor((4 / 3 + 1) / 2)
    )
