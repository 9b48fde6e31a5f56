import math

import pytest
import torch

from dmoe_train.regularizers import CoresetRegularizer, expected_union, perplexity
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
        scores = scores.clone().requires_grad_()
        size = reg.size([Routing(scores.new_zeros(1, 8, 2).long(), scores, scores)], 8, 2)
        size.backward()
        assert scores.grad.abs().sum() > 0
        sizes.append(size.item())
    assert sizes[0] < sizes[1]


def test_confident_tokens_keep_a_finite_gradient():
    scores = torch.full((1, 8, 16), 1e-4)
    scores[..., 3] = 1.0 - 1e-7  # saturated sigmoid: p_te rounds to 1 in fp32
    scores.requires_grad_()
    CoresetRegularizer("union").size([Routing(None, None, scores)], 8, 4).backward()
    assert torch.isfinite(scores.grad).all()


def test_none_regularizer_is_zero_and_bad_kind_rejected():
    scores = torch.rand(1, 4, 8)
    assert float(CoresetRegularizer("none", 0.0).size([Routing(None, None, scores)], 4, 2)) == 0
    with pytest.raises(ValueError, match="regularizer.kind"):
        CoresetRegularizer("bogus")
