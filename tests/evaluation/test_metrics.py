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


def test_expert_bytes_per_generated_token_sum_every_samples_own_forwards():
    from helpers import TINY_BASE

    from dmoe_train.evaluation.run import format_table
    from dmoe_train.evaluation.sampler import BlockDecode
    from dmoe_train.evaluation.split_decoding import GenerationSettings, MoeTimer, _metrics, _Tally
    from dmoe_train.models import load_model

    model = load_model(TINY_BASE)
    layers = 2  # the metrics average over whatever layers the generation reports
    # sample 0 uses 4 experts per layer in each of its 3 forwards, sample 1 uses 6 in its one
    unique = torch.tensor([[4.0, 6.0], [4.0, 6.0], [4.0, 6.0]])[..., None].expand(3, 2, layers)
    counted = torch.tensor([[True, True], [True, False], [True, False]])
    gen = BlockDecode(
        tokens=torch.zeros(2, 8, dtype=torch.long), unique_experts=unique,
        unique_experts_masked=unique, counted=counted,
        expert_load=torch.ones(layers, model.config.moe.num_experts), tokens_routed=64,
        seconds=1.0, blocks=1,
    )  # fmt: skip
    tally = _Tally()
    tally.add(gen, [True, False], [], gen_length=8)
    m = _metrics(model, GenerationSettings.preset("tiny"), tally, MoeTimer(model))
    expert = 3 * model.config.hidden_size * model.config.moe.expert_width
    expert *= next(model.parameters()).element_size()
    assert m.unique_experts_per_block == 5.0  # the mean of the samples' means
    # (4 x 3 + 6 x 1) experts over 2 x 8 generated tokens
    assert m.expert_bytes_per_generated_token == (4 * 3 + 6) * expert / 16
    assert m.forwards_per_block == 3.0
    # dmoe-eval's and make compare's table shows them beside unique experts per forward
    head, _, row = format_table([m.to_dict()]).splitlines()
    cells = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cells["forwards/block"] == "3.00"
    assert cells["expert KB/token"] == f"{18 * expert / 16 / 2**10:.1f}"
