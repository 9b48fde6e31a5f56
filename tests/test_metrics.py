import torch

from dmoe_train.objectives.expert_metrics import (
    expert_load,
    load_balance_cv,
    unique_experts_per_block,
)


def test_unique_experts_known_routing():
    # block size 2, k 2: block 0 uses {1, 2, 3}; block 1 uses {4} plus an empty slot; block 2
    # is partial (one position) and uses {5, 6}
    ids = torch.tensor([[[1, 2], [2, 3], [4, -1], [4, 4], [5, 6]]])
    assert unique_experts_per_block(ids, 2).tolist() == [[3, 1, 2]]
    valid = torch.tensor([[True, False, True, True, False]])
    assert unique_experts_per_block(ids, 2, valid).tolist() == [[2, 1, 0]]


def test_unique_experts_matches_direct_count():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 16, (3, 20, 4), generator=g)
    got = unique_experts_per_block(ids, 8)
    for b in range(3):
        for j, start in enumerate(range(0, 20, 8)):
            assert got[b, j] == len(set(ids[b, start : start + 8].flatten().tolist()))


def test_expert_load_and_its_balance():
    ids = torch.tensor([[[0, 1], [1, -1], [2, 1]]])
    load = expert_load(ids, 4, valid=torch.tensor([[True, True, False]]))
    assert load.tolist() == [1, 2, 0, 0]  # empty slots and invalid positions not counted
    assert load_balance_cv(torch.tensor([3, 3, 3])) == 0
    torch.testing.assert_close(load_balance_cv(torch.tensor([1.0, 3.0])), torch.tensor(0.5))
