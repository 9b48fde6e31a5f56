"""Self-distillation's KL and random inputs, and the coreset curriculum, by hand."""

import math

import pytest
import torch

from dmoe_train.objectives.curriculum import curriculum_policy
from dmoe_train.objectives.distillation import masked_kl, random_tokens
from dmoe_train.routing import RoutingPolicy


def test_masked_kl_by_hand():
    teacher = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # [1, 2, 2]: position 0 uniform
    student = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])  # position 0: (3/4, 1/4)
    masked = torch.tensor([[True, False]])
    want = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert masked_kl(teacher, student, masked, torch.tensor(1.0)).item() == pytest.approx(want)
    assert masked_kl(student, student, masked | True, torch.tensor(2.0)).item() == pytest.approx(0)


def test_random_tokens_skip_the_mask_and_follow_their_keys():
    tokens = random_tokens([1, 2, 1], 4000, vocab=10, mask_id=3)
    assert tokens.shape == (3, 4000)
    assert set(tokens.unique().tolist()) == {0, 1, 2, 4, 5, 6, 7, 8, 9}  # all but the mask
    assert torch.equal(tokens[0], tokens[2]) and not torch.equal(tokens[0], tokens[1])
    assert torch.equal(tokens[1], random_tokens([2], 4000, vocab=10, mask_id=3)[0])


def test_curriculum_values_by_hand():
    topp = RoutingPolicy("topp", block_size=8, top_p=0.5, min_experts=4)
    assert curriculum_policy(topp, 0.9, 0.0).top_p == pytest.approx(0.9)
    assert curriculum_policy(topp, 0.9, 0.25).top_p == pytest.approx(0.8)
    assert curriculum_policy(topp, 0.9, 7.0).top_p == pytest.approx(0.5)  # done: the target
    cap = RoutingPolicy("des_vote", block_size=8, capacity=8)
    assert curriculum_policy(cap, 24, 0.5).capacity == 16
    with pytest.raises(ValueError, match="curriculum_start"):
        curriculum_policy(RoutingPolicy("token"), 0.9, 0.5)
