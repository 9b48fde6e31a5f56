"""`dmoe-eval`: the reference it measures against, undefined shares, the cache's refusal and
figures. (docs/reliability.md lists the guarantees.)"""

import json
import logging

import pytest
from helpers import (
    TINY_BASE,
    compose_train,
    perturbed_router,
    steps,
)
from safetensors.torch import load_file
from spec_helpers import SUMS, data_only_instantiate, evaluate, write_jsonl

from dmoe_train.cli import export as export_cli
from dmoe_train.cli.train import train
from dmoe_train.evaluation.run import format_table
from dmoe_train.models import load_model
from dmoe_train.models.adapted_weights import save_adapted


def test_eval_reference_is_the_base_not_the_adapted_router(tmp_path):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    adapted = evaluate(tmp_path / "adapted", f"router_checkpoint={router}")
    base = evaluate(tmp_path / "base", "router=token", "reference_token=false")
    as_token = evaluate(
        tmp_path / "as_token", f"router_checkpoint={router}", "router=token", "reference_token=0"
    )
    # the adapted router under token routing is another model: the test tells the two apart
    assert as_token["unique_experts_per_block"] != base["unique_experts_per_block"]
    assert adapted["accuracy_token"] == base["accuracy"]
    assert adapted["unique_experts_token"] == base["unique_experts_per_block"]
    assert adapted["accuracy_retained"] == pytest.approx(adapted["accuracy"] / base["accuracy"])


def test_training_summary_reference_is_the_base_under_init_router(tmp_path):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    plain = train(compose_train(tmp_path / "plain", *steps(1)))
    started = train(compose_train(tmp_path / "init", *steps(1), f"init_router={router}"))
    assert started["val_loss_token"] == plain["val_loss_token"]
    assert started["unique_experts_token"] == plain["unique_experts_token"]
    assert started["val_loss_before"] != plain["val_loss_before"]  # it did start from the router


def test_a_reference_that_scored_zero_leaves_the_retained_share_undefined(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    words = [{"question": r["question"], "answer": "a word"} for r in SUMS]  # never right
    data = write_jsonl(tmp_path / "words.jsonl", words)
    metrics = evaluate(tmp_path / "eval", f"data.source={data}")
    assert metrics["accuracy_token"] == 0 and metrics["accuracy_retained"] is None
    assert "| undefined (reference 0) |" in caplog.text
    # 4 test rows (5% of 80): said, with the count
    assert "exact match on 4 samples of the test split (fewer than 30)" in caplog.text


def test_disk_store_with_a_checkpoint_that_changed_the_experts(tmp_path, monkeypatch):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    model = load_model(TINY_BASE)
    experts = {n: p.detach() for n, p in model.named_parameters() if ".mlp.experts." in n}
    manifest = json.loads(router.with_name("router.json").read_text())
    save_adapted({**load_file(router), **experts}, tmp_path / "ckpt", manifest)
    monkeypatch.setattr("dmoe_train.evaluation.run.instantiate", data_only_instantiate)
    with pytest.raises(ValueError) as refused:
        evaluate(
            tmp_path / "eval", f"router_checkpoint={router}", "generation.expert_cache=8",
            "generation.expert_store=disk",
        )  # fmt: skip
    message = str(refused.value)
    assert message.startswith("generation.expert_store=disk reads the base's routed experts")
    assert f"router_checkpoint={router} changed them" in message
    assert "\n" not in message and len(message) < len(str(router)) + 250  # no shape dump


def test_eval_says_where_metrics_went_and_shows_the_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    metrics = evaluate(tmp_path / "eval", "generation.expert_cache=8", "reference_token=false")
    assert f"metrics: {tmp_path / 'eval' / 'metrics.json'}" in caplog.text
    head, _, row = format_table([metrics]).splitlines()
    cells = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cells["expert cache"] == "8" and float(cells["MB loaded/block"]) > 0


def test_eval_of_an_export_measures_against_its_base(tmp_path):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    exported = export_cli.export(router, tmp_path / "exp")
    base = evaluate(tmp_path / "base", "router=token", "reference_token=false")
    metrics = evaluate(tmp_path / "of_export", f"model.path={exported}")
    assert metrics["reference"].startswith(f"{TINY_BASE} under token routing (the base")
    assert metrics["accuracy_token"] == base["accuracy"]
    # the base no longer at hand: the export's own token routing, and said so
    record = json.loads((exported / "dmoe_export.json").read_text())
    record["base"] = str(tmp_path / "moved")
    (exported / "dmoe_export.json").write_text(json.dumps(record))
    alone = evaluate(tmp_path / "alone", f"model.path={exported}")
    assert alone["reference"].startswith(f"the export {exported} itself under token routing")
    assert "is not at hand" in alone["reference"]


def test_skills_report_exact_match_and_the_final_answer_per_skill(tmp_path):
    # the 256-expert base on two skills it knows and two of the broad suite it never saw
    metrics = evaluate(
        tmp_path / "eval", "model=tiny256", "generation=tiny256", "data=broad_skills",
        "data.test_size=16", "data.test_skills=[sort,count,max,parity]", "reference_token=false",
    )  # fmt: skip
    skills = ["sort", "count", "max", "parity"] * 4
    exact, final = metrics["correct"], metrics["final_answer_correct"]
    assert len(exact) == len(final) == 16 and all(f for e, f in zip(exact, final, strict=True) if e)
    for key, hits in (("accuracy_by_skill", exact), ("final_answer_by_skill", final)):
        assert metrics[key] == {
            s: sum(h for k, h in zip(skills, hits, strict=True) if k == s) / 4
            for s in sorted(set(skills))
        }
    assert metrics["accuracy_by_skill"]["sort"] > 0 == metrics["accuracy_by_skill"]["max"]
