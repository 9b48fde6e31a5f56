"""Self-distillation and the curriculum inside a run: the teacher is the starting model under
token routing, random inputs hold no task token, a curriculum run ends under its own policy."""

import pytest
import torch
from helpers import RecordTopP, compose_train, steps

from dmoe_train.cli.train import build, train


def _batch(run):
    return next(iter(run.data.stream_loader(1)))


def test_teacher_is_the_starting_router_under_token_routing(tmp_path):
    token = build(compose_train(tmp_path / "t", "router=token", "module.distill_weight=1.0"))
    batch = _batch(token)
    assert token.module.step_stats(batch, 0)["distill_kl"].item() == pytest.approx(0, abs=1e-6)
    with torch.no_grad():  # a trained router: the teacher stays the starting one
        for p in token.module.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    assert token.module.step_stats(batch, 0)["distill_kl"].item() > 1e-3
    block = build(
        compose_train(
            tmp_path / "b", "router.top_p=0.5", "module.distill_weight=0.5", "regularizer=union",
            "regularizer.weight=0.03",
        )
    )  # fmt: skip
    stats = block.module.step_stats(batch, 0)
    assert stats["distill_kl"].item() > 1e-3
    assert stats["loss"].item() == pytest.approx(
        (stats["lm_loss"] + 0.5 * stats["distill_kl"]).item()
        + 0.03 * stats["regularizer"].item() / 32,  # the union weight, 32 experts
        rel=1e-5,
    )


def test_distillation_on_random_inputs_holds_no_task_token(tmp_path):
    block = build(
        compose_train(
            tmp_path, "router.top_p=0.5", "module.distill_weight=1.0",
            "module.distill_inputs=random",
        )
    )  # fmt: skip
    batch = _batch(block)
    seen = []
    forward = block.module.model.forward
    block.module.model.forward = lambda ids, *a, **kw: seen.append(ids) or forward(ids, *a, **kw)
    stats = block.module.step_stats(batch, 0)
    assert stats["distill_kl"].item() > 1e-3
    # the training forward, then the student and the teacher on the same random input
    assert len(seen) == 3 and torch.equal(seen[1], seen[2])
    # block diffusion reads [x_t, x_0]: the clean half is the batch, then tokens of no task
    x0 = batch["input_ids"]
    assert torch.equal(seen[0][:, x0.shape[1] :], x0)
    assert (seen[1][:, x0.shape[1] :] != x0).float().mean() > 0.9
    token = build(
        compose_train(
            tmp_path / "t", "router=token", "module.distill_weight=1.0",
            "module.distill_inputs=random",
        )
    )  # fmt: skip
    assert token.module.step_stats(batch, 0)["distill_kl"].item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="module.distill_inputs='task'"):
        build(compose_train(tmp_path / "bad", "module.distill_inputs=task"))


def test_a_curriculum_run_ends_under_its_own_policy(tmp_path):
    RecordTopP.seen.clear()
    summary = train(
        compose_train(
            tmp_path, *steps(4), "router.top_p=0.5", "module.curriculum_start=0.9",
            "module.curriculum_fraction=0.5", "+callbacks.record._target_=helpers.RecordTopP",
        )
    )  # fmt: skip
    # steps 0, 1 move 0.9 -> 0.5 over half of the 4 steps; then the target
    assert RecordTopP.seen == pytest.approx([0.9, 0.7, 0.5, 0.5])
    assert summary["policy"]["top_p"] == 0.5
    assert summary["unique_experts_after"] <= summary["unique_experts_token"]
    with pytest.raises(ValueError, match="curriculum_start"):
        build(compose_train(tmp_path / "bad", "router=token", "module.curriculum_start=0.9"))
    # and the run names the key under its group
    with pytest.raises(ValueError, match="^module.curriculum_start=0.9 with router name 'token'"):
        build(compose_train(tmp_path / "bad", "router=token", "module.curriculum_start=0.9"))
