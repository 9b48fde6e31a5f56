import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, FAST, run_cli
from hydra import compose, initialize_config_dir

from dmoe_train.evaluation import split_decoding as decoding_eval
from dmoe_train.evaluation.run import run_eval
from dmoe_train.evaluation.sampler import block_layout, decode_blocks
from dmoe_train.evaluation.split_decoding import (
    GenerationSettings,
    answer_correct,
    interleaved_latency,
)
from dmoe_train.models import build_model
from dmoe_train.models.lm import LMOutput
from dmoe_train.routing import Routing, RoutingPolicy

MASK, EOS, VOCAB = 1, 0, 8


class FixedLogits(torch.nn.Module):
    """Predicts token 2 + (position % 5) at every position with probability fixed by the test;
    routes position p to experts {p, p + 1} so that expert counts are known."""

    def __init__(self, confidence: list[float]) -> None:
        super().__init__()
        self.confidence = torch.tensor(confidence)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.calls: list[torch.Tensor] = []

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, valid=None, past_key_values=None
    ):
        self.calls.append(input_ids.clone())
        b, n = input_ids.shape
        pos = position_ids
        logits = torch.full((b, n, VOCAB), -20.0)
        target = 2 + pos % 5
        c = self.confidence[pos.clamp(max=len(self.confidence) - 1)]
        logits.scatter_(-1, target[..., None], torch.log(c / (1 - c))[..., None])
        logits[..., VOCAB - 1] = 0.0  # one other token takes the rest: softmax(target) = c
        ids = torch.stack([pos, pos + 1], -1)
        routing = Routing(ids, torch.ones(b, n, 2) / 2, torch.zeros(b, n, 16))
        return LMOutput(logits, [routing], [(torch.zeros(b, 1, n, 1), torch.zeros(b, 1, n, 1))])


def test_low_confidence_remasking_commits_most_confident_first():
    # prompt of 4 fills block 0; block 1 = positions 4..7 with confidences .6 .9 .7 .8
    model = FixedLogits([0.5] * 4 + [0.6, 0.9, 0.7, 0.8])
    out = decode_blocks(model, [[5] * 4], 4, 4, 4, MASK, EOS)
    assert out.tokens.tolist() == [[2 + 4 % 5, 2 + 5 % 5, 2 + 6 % 5, 2 + 7 % 5]]
    masks = [int((c[0, 4:] == MASK).sum()) for c in model.calls]
    assert masks == [4, 3, 2, 1]  # one commit per step
    committed = [
        torch.nonzero((a[0, 4:] == MASK) & (b[0, 4:] != MASK)).flatten().tolist()
        for a, b in zip(model.calls, model.calls[1:], strict=False)
    ]
    assert committed == [[1], [3], [2]]  # .9, then .8, then .7; .6 is last


def test_threshold_commits_all_above_it_and_at_least_one():
    model = FixedLogits([0.5] * 4 + [0.96, 0.99, 0.3, 0.97])
    decode_blocks(model, [[5] * 4], 4, 4, 4, MASK, EOS, threshold=0.95)
    masks = [int((c[0, 4:] == MASK).sum()) for c in model.calls]
    assert masks == [4, 1]  # three above .95 in one step, then the last one alone


def test_unique_experts_of_a_known_routing():
    model = FixedLogits([0.9] * 16)
    out = decode_blocks(model, [[5, 5]], 6, 4, 2, MASK, EOS)
    # first forward of block 0: positions 0..3 route to {p, p+1}: experts 0..4 = 5 distinct;
    # masked positions 2, 3 alone: {2, 3, 4} = 3
    assert out.unique_experts[0, 0, 0] == 5 and out.unique_experts_masked[0, 0, 0] == 3


def test_block_layout_aligns_prompts_to_blocks():
    lay = block_layout([[7] * 3, [7] * 6], gen_length=4, block_length=4, pad_id=0, mask_id=1)
    assert lay.positions[0, 4].item() == 0 and lay.valid[0, :4].sum() == 0  # padded by a block
    assert lay.positions[1, 0].item() == 0
    assert lay.generated.sum(1).tolist() == [4, 4]


@pytest.mark.parametrize("policy", ["token", "topp"])
def test_cache_gives_identical_tokens(policy):
    model = build_model("tiny", seed=3)
    model.set_routing(
        RoutingPolicy.from_record(dict(name=policy, block_size=4, top_p=0.5, min_experts=4))
    )
    prompts = [[5, 9, 11], [7, 8, 9, 10, 11, 12, 13], [20]]
    plain = decode_blocks(model, prompts, 9, 4, 4, 1, 0)
    cached = decode_blocks(model, prompts, 9, 4, 4, 1, 0, cache=True)
    assert torch.equal(plain.tokens, cached.tokens)
    assert torch.equal(plain.unique_experts, cached.unique_experts)


def test_gsm8k_answers_use_the_last_number():
    assert answer_correct("so 3 + 4 = 7. The answer is 1,234.", "... #### 1234")
    assert not answer_correct("The answer is 12", "#### 1234")
    assert answer_correct(" 47", "47") and not answer_correct("47", "-47")


def _eval_cfg(out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "eval",
            [
                f"paths.output_dir={out}",
                "generation.max_samples=16",
                "data.train_size=16",
                "data.val_size=16",
                *overrides,
            ],
        )


def test_dmoe_eval_writes_metrics(tmp_path):
    metrics = run_eval(_eval_cfg(tmp_path, "router=des_vote"))
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["samples"] == 16 and written["policy"]["name"] == "des_vote"
    assert written["unique_experts_per_block"] <= 8 + 1e-6  # capacity 8 bounds it
    assert 0 < metrics["expert_bytes_fraction"] < 1
    assert len(written["unique_experts_per_block_per_layer"]) == 3


def test_block_size_must_match_decoding_blocks(tmp_path):
    with pytest.raises(ValueError, match="router.block_size=4"):
        run_eval(_eval_cfg(tmp_path, "router=topp", "router.block_size=4"))


@pytest.mark.slow
def test_two_point_sweep_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    sweep_args = ["-m", "router.top_p=0.5,0.9", "trainer.max_steps=3", "evaluate_after=true"]
    result = run_cli(*sweep_args, "generation.max_samples=8", f"hydra.sweep.dir={sweep}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    module = "dmoe_train.studies.summarize_sweep"
    subprocess.run([sys.executable, "-m", module, str(sweep)], check=True, capture_output=True)
    table = (sweep / "sweep.md").read_text()
    assert "router.top_p=0.5" in table and "router.top_p=0.9" in table
    assert (sweep / "sweep.png").is_file() and len(
        (sweep / "sweep.csv").read_text().splitlines()
    ) == 3


def test_latency_rounds_against_a_reference(monkeypatch):
    token, topp = build_model("tiny", seed=0), build_model("tiny", seed=0)
    topp.set_routing(RoutingPolicy("topp", block_size=4, top_p=0.5, min_experts=4))
    settings = GenerationSettings.preset("tiny", block_length=4, steps=4)
    runs = {"token": (token, settings), "topp": (topp, settings)}
    calls = []
    real = decoding_eval.time_decode

    def counted(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(decoding_eval, "time_decode", counted)
    latency = interleaved_latency(runs, "token", [[5, 6, 7], [8, 9]], 8, rounds=3)
    # a warm-up round, then 3 rounds, each run once per round, in turn
    assert calls == [token, topp] * 4
    assert latency["token"]["latency_vs_token"] == 1.0
    assert latency["topp"]["latency_vs_token"] > 0 and latency["topp"]["latency_ms_per_token"] > 0


def test_each_sample_counts_only_its_own_forwards():
    """A batch decodes on for its slowest sample; the finished one's extra forwards do not
    count, so a sample's figures do not depend on the batch it is in."""
    model = build_model("tiny", seed=0)
    cfg = model.config
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    args = (8, 4, 4, cfg.mask_token_id, cfg.eos_token_id)
    together = decode_blocks(model, prompts, *args)
    for i, prompt in enumerate(prompts):
        alone = decode_blocks(model, [prompt], *args)
        assert torch.equal(alone.tokens[0], together.tokens[i])
        torch.testing.assert_close(
            alone.per_sample(alone.unique_experts)[0],
            together.per_sample(together.unique_experts)[i],
        )


def test_dmoe_eval_decodes_diffusion_gemma_canvases_and_counts_their_experts(tmp_path):
    from helpers import tiny_gemma_dir

    base = tiny_gemma_dir(tmp_path / "base", experts=32, k=4)
    overrides = [f"model.path={base}", "model=tiny_gemma", "data=skills", "generation=tiny_gemma",
                 "generation.steps=3", "generation.max_samples=4", "data.test_size=4"]  # fmt: skip
    pool = run_eval(_eval_cfg(tmp_path, *overrides, "router=capacity_max", "router.capacity=8",
                              "router.block_size=32"))  # fmt: skip
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["samples"] == 4 and written["policy"]["name"] == "capacity_max"
    assert len(written["correct"]) == 4 and written["reference"].endswith("under token routing")
    # random weights never settle: every canvas of 64 takes all 3 forwards; a pool of 8 per
    # block of 32, two blocks per canvas
    assert pool["forwards_per_canvas"] == 3 and pool["tokens_per_forward"] > 0
    assert pool["unique_experts_per_block"] <= 8 < pool["unique_experts_token"]
    assert pool["unique_experts_per_block"] <= pool["unique_experts_per_canvas"] <= 16
    assert pool["unique_experts_per_canvas"] < pool["unique_experts_per_canvas_token"] <= 32
