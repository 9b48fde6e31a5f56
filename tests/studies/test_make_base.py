import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmoe_train.data.skills import BROAD
from dmoe_train.models import load_model

MAKE_BASE = (sys.executable, "-m", "dmoe_train.studies.make_base")


@pytest.mark.slow
def test_a_few_steps_write_a_base_that_loads(tmp_path):
    out = tmp_path / "base"
    run = [*MAKE_BASE, "--steps", "3", "--out", str(out), "--eval-every", "0", "--val-size", "16"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    quality = json.loads((out / "quality.json").read_text())
    assert quality["train_steps"] == 3 and 0.0 <= quality["exact_match"] <= 1.0
    assert not (out / "training_state.pt").exists()  # the base is written: nothing to resume
    model = load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16  # saved as shipped
    assert model.config.num_experts == 32 and model.config.routing.name == "token"


@pytest.mark.slow
def test_the_256_expert_recipe_writes_its_regime_and_per_skill_quality(tmp_path):
    # the broad base's recipe: tiny256's model and decoding on the 12 skills
    base, skills = "tiny256-broad", BROAD
    out = tmp_path / "base256"
    run = [*MAKE_BASE, "--base", base, "--steps", "2", "--test-size", "12"]
    run += ["--train-size", "200", "--val-size", "16"]
    run += ["--eval-every", "0", "--out", str(out)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    quality = json.loads((out / "quality.json").read_text())
    assert (
        set(quality["exact_match_by_skill"]) == set(quality["final_answer_by_skill"]) == set(skills)
    )
    assert quality["test_problems"] == 12 and quality["decoding"]["threshold"] == 0.95
    assert quality["recipe"]["suite"] == "broad"
    cfg = load_model(out).config
    regime = (cfg.num_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group)
    assert regime == (256, 8, 8, 4) and cfg.num_shared_experts == 1
    assert cfg.first_k_dense_replace == 1 and cfg.routed_scaling_factor == 2.5


@pytest.mark.slow
def test_an_expert_choice_base_trains_balanced_and_records_its_curve(tmp_path):
    out = tmp_path / "ec"
    run = [*MAKE_BASE, "--val-size", "16", "--steps", "4", "--val-every", "2", "--eval-every", "0"]
    run += ["--routing", "expert_choice", "--ec-group", "block", "--test-size", "8"]
    run += ["--out", str(out)]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    quality = json.loads((out / "quality.json").read_text())
    curve = quality["curve"]
    assert [row["step"] for row in curve] == [2, 4]
    assert curve[1]["tokens"] == 2 * curve[0]["tokens"] > 0
    assert all(row["val_loss"] > 0 for row in curve)
    # every expert takes k * T / E tokens of every block of x_t: perfectly even load
    assert all(row["load_cv"] == pytest.approx(0.0, abs=1e-6) for row in curve)
    assert len(quality["correct"]) == 8
    model = load_model(out)
    assert model.config.routing.name == "expert_choice"
    assert model.config.routing.ec_group == "block"
    # expert choice balances by construction: the bias is never moved
    biases = [layer.mlp.gate.expert_bias for layer in model.model.layers[1:]]
    assert all(float(b.float().abs().max()) == 0.0 for b in biases)


def test_router_noise_moves_training_scores_only():
    from dmoe_train.models import build_model
    from dmoe_train.studies.make_base import perturb_routing

    plain, noisy = build_model("tiny", seed=0), build_model("tiny", seed=0)
    perturb_routing(noisy, 1.0, 0.0, span=8, seed=0)
    ids = torch.randint(3, 60, (2, 8))
    with torch.no_grad():
        for model in (plain, noisy):
            model.eval()
        eval_scores = [m(ids).routing[0].scores for m in (plain, noisy)]
        for model in (plain, noisy):
            model.train()
        train_scores = [m(ids).routing[0].scores for m in (plain, noisy)]
    assert torch.equal(eval_scores[0], eval_scores[1])
    assert not torch.allclose(train_scores[0], train_scores[1])
    assert torch.equal(train_scores[0], eval_scores[0])


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [("--expert-dropout", "1", "a share in"), ("--router-noise", "-0.5", "a std")],
)
def test_a_perturbation_out_of_range_is_refused_by_name(flag, value, says, monkeypatch, capsys):
    from dmoe_train.studies import make_base

    monkeypatch.setattr(sys, "argv", ["make_base", flag, value])
    with pytest.raises(SystemExit) as exit_:
        make_base.parse_args()
    assert exit_.value.code == 2
    assert f"{flag} {float(value)}: {says}" in capsys.readouterr().err


@pytest.mark.parametrize("span", [32, 1])  # each block shares one draw, or each token its own
def test_expert_dropout_leaves_each_training_span_without_its_dropped_experts(span):
    from dmoe_train.models import build_model
    from dmoe_train.studies.make_base import perturb_routing

    plain, dropped = build_model("tiny256", seed=0), build_model("tiny256", seed=0)
    perturb_routing(dropped, 0.0, 0.75, span=span, seed=0)
    ids = torch.randint(3, 60, (2, 80))  # with blocks: 32, 32 and 16 tokens
    with torch.no_grad():
        for model in (plain, dropped):
            model.train()
        train = [m(ids).routing for m in (plain, dropped)]
        dropped.eval()
        evaluated = dropped(ids).routing
    # the dropped experts, drawn as the hook draws them: per MoE layer, sequence and span
    gen = torch.Generator().manual_seed(0)
    spans = -(-80 // span)
    drops = [torch.rand(2, spans, 256, generator=gen) < 0.75 for _ in train[1]]
    for b in range(2):
        for t in range(80):
            for routing, drop in zip(train[1], drops, strict=True):
                assert not drop[b, t // span, routing.ids[b, t]].any()
    # the first MoE layer sees the same input: its free tokens would use dropped experts
    free = train[0][0].ids
    assert any(drops[0][b, t // span, free[b, t]].any() for b in range(2) for t in range(80))
    assert torch.equal(train[0][0].scores, train[1][0].scores)  # dropout steers selection only
    assert all(torch.equal(p.ids, e.ids) for p, e in zip(train[0], evaluated, strict=True))


def test_an_interrupted_base_resumes_as_the_uninterrupted_run(tmp_path, tokenizer_dir, monkeypatch):
    from itertools import islice

    from dmoe_train.data.module import data_module
    from dmoe_train.models import build_model
    from dmoe_train.studies import make_base

    flags = ["--steps", "6", "--val-every", "2", "--eval-every", "0", "--router-noise", "0.5"]
    monkeypatch.setattr(sys, "argv", ["make_base", *flags, "--checkpoint-every", "3"])
    args = make_base.parse_args()

    def train(state, stop_after=None):
        model = build_model("tiny", seed=0)
        routing = make_base.perturb_routing(model, args.router_noise, 0.5, 8, args.seed)
        data = data_module(
            str(tokenizer_dir),
            max_seq_len=16,
            batch_size=4,
            train_size=64,
            val_size=16,
            test_size=8,
        )
        data.setup()
        if stop_after:  # the process dies after `stop_after` steps
            stream = data.stream_loader
            data.stream_loader = lambda steps, start: islice(stream(steps, start), stop_after)
        return model, make_base.train_base(model, data, args, state, routing)

    whole, whole_curve = train(tmp_path / "whole.pt")
    train(tmp_path / "cut.pt", stop_after=4)  # saved at step 3; step 4 is lost
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["run"]["step"] == 3
    resumed, resumed_curve = train(tmp_path / "cut.pt")
    timeless = [
        [{k: v for k, v in r.items() if k != "seconds"} for r in c]
        for c in (whole_curve, resumed_curve)
    ]
    assert timeless[0] == timeless[1] and [r["step"] for r in whole_curve] == [2, 4, 6]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and expert biases, bit for bit
    # a state of other settings is refused, named, and left as it is
    monkeypatch.setattr(sys, "argv", ["make_base", *flags, "--lr", "1e-3"])
    args = make_base.parse_args()
    before = (tmp_path / "cut.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"cut.pt: a run of other settings \(lr\)"):
        train(tmp_path / "cut.pt")
    assert (tmp_path / "cut.pt").read_bytes() == before


@pytest.mark.parametrize(
    "base", ["tiny256", "tiny256-broad", "tiny256-calibrated", "tiny256-dropout"]
)
def test_each_shipped_256_expert_base_is_what_its_preset_trains(base, monkeypatch):
    from dmoe_train.locations import ASSETS
    from dmoe_train.studies import make_base

    monkeypatch.setattr(sys, "argv", ["make_base", "--base", base])
    args = make_base.parse_args()
    quality = json.loads((ASSETS / Path(args.out).name / "quality.json").read_text())
    assert quality["base"] == base and quality["train_steps"] == args.steps
    recorded = make_base.RECIPE_DEFAULTS | quality["recipe"]  # a knob it predates: the default
    for key in ("lr", "suite", *make_base.RECIPE_DEFAULTS):
        assert recorded[key] == getattr(args, key), key
