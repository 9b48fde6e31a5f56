"""The lm-evaluation-harness model `dmoe`, accelerate's data parallelism and device maps."""

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from helpers import PROJECT_ROOT, TINY_BASE, perturbed_router, run_cli

from dmoe_train.data.tokenizer import load_tokenizer
from dmoe_train.evaluation.lm_eval_model import DiffusionLM, stop_at
from dmoe_train.evaluation.sampler import decode_blocks
from dmoe_train.models import load_model
from dmoe_train.models.placement import parse_max_memory, place_model

TASKS = PROJECT_ROOT / "tests" / "lm_eval_tasks"
LM_EVAL = ("--tasks", "tiny_arith,tiny_arith_choice", "--include_path", str(TASKS))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def test_stop_sequences_cut_at_the_first():
    assert stop_at("12\n34Q:", ["Q:", "\n"]) == "12"
    assert stop_at("12", ["\n"]) == "12" and stop_at("12", []) == "12"


def test_model_args_choose_rule_and_decoding():
    lm = DiffusionLM(str(TINY_BASE), routing="dmoe", min_experts=8, mc_samples=4)
    assert (lm.policy.rule, lm.policy.block_size, lm.policy.min_experts) == ("dmoe", 8, 8)
    assert lm.settings.block_length == 8 and lm.settings.threshold is None
    llada2 = DiffusionLM(str(TINY_BASE), routing="token", decoding="llada2")
    assert (llada2.settings.block_length, llada2.settings.steps) == (32, 32)
    assert llada2.settings.threshold == 0.95
    with pytest.raises(ValueError, match="routing='nope'|router=.*nope"):
        DiffusionLM(str(TINY_BASE), routing="nope")
    with pytest.raises(ValueError, match="top_q"):
        DiffusionLM(str(TINY_BASE), top_q=0.5)


def test_loglikelihood_is_deterministic_and_prefers_the_answer():
    lm = DiffusionLM(str(TINY_BASE), routing="token", mc_samples=8, batch_size=4)
    right, greedy = lm.continuation_loglikelihood("45+8=", "53")
    assert (right, greedy) == lm.continuation_loglikelihood("45+8=", "53")
    assert right < 0
    # letters never follow "=" in the task: far less likely than the digits of the answer
    wrong, wrong_greedy = lm.continuation_loglikelihood("45+8=", "ab")
    assert wrong < right - 5 and not wrong_greedy


def test_a_device_map_that_offloads_layers_gives_the_same_tokens(tmp_path):
    tokenizer = load_tokenizer(TINY_BASE)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("45+8=", "26-70=")]
    model = load_model(TINY_BASE)
    args = (prompts, 8, 8, 8, model.config.mask_token_id, model.config.eos_token_id)
    reference = decode_blocks(model, *args, cache=True).tokens
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    placed = place_model(
        load_model(TINY_BASE), {"cpu": int(size * 0.5), "disk": 10 * size}, tmp_path / "offload"
    )
    assert "disk" in placed.hf_device_map.values()  # some layers really live on disk
    assert torch.equal(decode_blocks(placed, *args, cache=True).tokens, reference)
    assert parse_max_memory("0:70GiB;cpu:200GiB") == {0: "70GiB", "cpu": "200GiB"}
    with pytest.raises(ValueError, match="max_memory='0'"):
        parse_max_memory("0")


def _lm_eval(out: Path, model_args: str, launch: tuple[str, ...] | None = None) -> dict:
    """`dmoe-lm-eval` (lm-eval's CLI with our model) on the shipped tasks; its results."""
    args = ("--model", "dmoe", "--model_args", model_args, *LM_EVAL, "--batch_size", "16")
    cmd = launch or (sys.executable, "-m", "dmoe_train.cli.lm_eval")
    env_before = dict(os.environ)
    os.environ.update(OFFLINE)
    try:
        done = run_cli(
            *args, "--device", "cpu", "--output_path", str(out), cmd=cmd, cwd=PROJECT_ROOT
        )
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    metrics = json.loads(results.read_text())["results"]
    routing = json.loads((out / "dmoe_routing.json").read_text())
    return {
        "exact_match": metrics["tiny_arith"]["exact_match,none"],
        "acc": metrics["tiny_arith_choice"]["acc,none"],
        **routing,
    }


@pytest.mark.slow
def test_lm_eval_token_routing_trained_router_and_two_processes(tmp_path):
    base = f"pretrained={TINY_BASE},mc_samples=8"
    token = _lm_eval(tmp_path / "token", f"{base},routing=token")
    assert token["unique_experts_per_block"] > 8  # top-4 of 32 experts over blocks of 8
    assert 0.25 < token["acc"] <= 1.0 and 0.2 < token["exact_match"] <= 1.0

    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")  # adapted weights under topp 0.5
    trained = _lm_eval(tmp_path / "trained", f"{base},router={router}")
    assert trained["routing"].startswith("topp [dmoe-train")
    assert trained["router"] == str(router) and token["router"] == "the base's own"
    assert trained["unique_experts_per_block"] < token["unique_experts_per_block"]

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    # two CPU processes: torch's launcher (accelerate's --cpu starts one without mpirun)
    with socket.socket() as free:  # a port no other test's process group holds
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    launch = (accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1")
    launch += ("--main_process_port", port)
    launch += ("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dmoe_train.cli.lm_eval")
    two = _lm_eval(tmp_path / "two", f"{base},routing=token", launch)
    assert two.pop("processes") == 2 and token.pop("processes") == 1
    assert two.pop("decoding") == token.pop("decoding")
    assert two.pop("routing") == token.pop("routing") == "token"
    assert two.pop("router") == token.pop("router")
    assert two.pop("peak_rss_bytes") > 0 and token.pop("peak_rss_bytes") > 0  # each process's
    # the same metrics and routing statistics as one process (sums in another order)
    assert two == pytest.approx(token, rel=1e-6)


def test_dmoe_on_a_diffusion_gemma_directory_generates_by_canvases_and_refuses_likelihoods(
    tmp_path,
):
    from types import SimpleNamespace

    from helpers import tiny_gemma_dir

    from dmoe_train.evaluation.lm_eval_model import CanvasLM

    base = str(tiny_gemma_dir(tmp_path / "base", experts=32, k=4))
    lm = DiffusionLM(base, routing="capacity_max", capacity=8, steps=2, batch_size=2)
    assert isinstance(lm, CanvasLM) and lm.policy.name == "capacity_max"
    assert (lm.policy.block_size, lm.settings.steps) == (32, 2)
    asks = [SimpleNamespace(args=(p, {"until": ["\n"], "max_gen_toks": 8})) for p in ("1+2=", "a")]
    texts = lm.generate_until([*asks, asks[0]])
    assert len(texts) == 3 and all("\n" not in t and len(t) <= 8 for t in texts)
    report = lm.routing_report()
    assert 0 < report["unique_experts_per_block"] <= 8  # the pool of 8 bounds every block
    assert report["unique_experts_per_block"] <= report["unique_experts_per_canvas"] <= 16
    with pytest.raises(NotImplementedError, match="uniform-state diffusion"):
        lm.loglikelihood([SimpleNamespace(args=("1+2=", "3"))])
    with pytest.raises(ValueError, match=r"\['threshold'\]: unknown to the dmoe canvas model"):
        DiffusionLM(base, threshold=0.9)
