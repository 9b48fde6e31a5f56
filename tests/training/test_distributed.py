"""Multi-process training on CPU: DDP (gloo) and FSDP2, resume, Hydra multirun and torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    FAST,
    TRAIN_CMD,
    cli_train,
    compose_train,
    router_of,
    run_cli,
    steps,
    tiny_gemma_dir,
)
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

from dmoe_train.cli.train import train
from dmoe_train.training.run_dirs import check_same_output_dir, run_id

# an objective whose ranks sum to one process's up to float rounding: a coreset that keeps nearly
# every voted expert (no boundary tie a summation order can flip) and no distillation
EQUIVALENT = [
    "router.top_p=0.99", "regularizer=union", "regularizer.weight=0.03", "module.distill_weight=0",
]  # fmt: skip
# 6 steps of 2 x 16 samples (or 1 x 32): the same global batch of the same samples and noise
SHORT = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    *EQUIVALENT,
]
TWO_RANKS = {
    "ddp_cpu": ["trainer=ddp_cpu", "data.batch_size=16"],
    "fsdp": [  # FSDP2 on CPU: the trainer=fsdp config with a CPU accelerator
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "trainer.deterministic=true",
        "data.batch_size=16",
    ],
}
# ranks sum in another order than one process: float rounding only (observed: 1.5e-8)
ATOL = 1e-6


def _run(out: Path, *overrides: str) -> dict:
    """The run's summary ({} for an interrupted run, which writes none)."""
    out.mkdir(parents=True, exist_ok=True)
    save = ["+callbacks.ranks._target_=helpers.SaveRankRouter", f"+callbacks.ranks.dirpath={out}"]
    result = cli_train(out, *SHORT, *save, *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "trainable"), [("ddp_cpu", "router"), ("fsdp", "router+lora+shared")]
)
def test_two_ranks_match_one_process_and_resume(tmp_path, strategy, trainable):
    # DDP on the router alone; FSDP2 on the router with peft adapters and the shared expert
    chosen = [f"module.trainable={trainable}"] + ["module.lora.rank=2"] * ("lora" in trainable)
    single = _run(tmp_path / "one", "data.batch_size=32", *chosen)
    full = _run(tmp_path / "full", *TWO_RANKS[strategy], *chosen)
    assert full["world_size"] == 2 and full["steps"] == single["steps"] == 6
    ranks = [torch.load(tmp_path / "full" / f"rank{r}.pt") for r in (0, 1)]
    reference = router_of(tmp_path / "one")
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    assert ("shared" in trainable) == any(".shared_experts." in n for n in reference)
    assert ("lora" in trainable) == any(".lora_B." in n for n in reference)
    for name in reference:
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # replicas never drift
        torch.testing.assert_close(ranks[0][name], reference[name], rtol=0, atol=ATOL)
    # each rank reports its own throughput and peak memory; the global batch is one process's
    used = [json.loads((tmp_path / "full" / f"resources.rank{r}.json").read_text()) for r in (0, 1)]
    alone = json.loads((tmp_path / "one" / "resources.rank0.json").read_text())
    assert [u["rank"] for u in used] == [0, 1] and {u["world_size"] for u in used} == {2}
    assert {u["batches"] for u in used} == {alone["batches"]} == {6}
    for u in used:
        assert 0 < u["loaded_peak_bytes"] <= u["peak_bytes"]
        assert u["tokens_per_s"] == pytest.approx(32 * 16 / u["step_s"], rel=1e-6)
    assert full["val_loss_after"] == pytest.approx(single["val_loss_after"], abs=ATOL)
    assert full["unique_experts_after"] == pytest.approx(single["unique_experts_after"], abs=1e-4)

    # interrupted after step 3, resumed in the same run directory: the same weights, bit for bit
    stop = ["+callbacks.stop._target_=helpers.InterruptAtStep", "+callbacks.stop.step=3"]
    assert _run(tmp_path / "resumed", *TWO_RANKS[strategy], *chosen, *stop) == {}  # interrupted
    assert _run(tmp_path / "resumed", *TWO_RANKS[strategy], *chosen, *stop)["steps"] == 6
    resumed, uninterrupted = router_of(tmp_path / "resumed"), router_of(tmp_path / "full")
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name


@pytest.fixture(scope="module")
def gemma(tmp_path_factory) -> tuple[list[str], Path]:
    """The tiny DiffusionGemma's router+lora fine-tune and its one-process run."""
    base = tiny_gemma_dir(tmp_path_factory.mktemp("gemma_base"))
    overrides = ["experiment=tiny_gemma_topp", f"model.path={base}", "router.min_experts=4",
                 "module.trainable=router+lora", "module.lora.rank=2"]  # fmt: skip
    one = tmp_path_factory.mktemp("gemma_one")
    assert _run(one, "data.batch_size=32", *overrides)["steps"] == 6
    return overrides, one


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(TWO_RANKS))
def test_diffusion_gemma_two_ranks_match_one_process(tmp_path, gemma, strategy):
    # transformers' model with its canvas objective: each sample's corruption and
    # self-conditioning coin keyed by its index, prompts padded to one width on every rank and
    # both losses over global counts, so two ranks make one process's global batch. Under FSDP
    # the encoder's and the decoder's layer i (one set of tied weights) are one unit, and an
    # interrupted run resumes to the uninterrupted one's weights bit for bit
    overrides, one_dir = gemma
    assert _run(tmp_path / "full", *TWO_RANKS[strategy], *overrides)["world_size"] == 2
    one, two = router_of(one_dir), router_of(tmp_path / "full")
    assert one.keys() == two.keys() and any(".lora_B." in n for n in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=ATOL)
    if strategy == "ddp_cpu":  # DDP's resume is the LLaDA2 cases', one process's Gemma's in
        return  # tests/training/test_gemma_training.py; FSDP's sharded one is new here
    stop = ["+callbacks.stop._target_=helpers.InterruptAtStep", "+callbacks.stop.step=3"]
    assert _run(tmp_path / "resumed", *TWO_RANKS[strategy], *overrides, *stop) == {}
    assert _run(tmp_path / "resumed", *TWO_RANKS[strategy], *overrides, *stop)["steps"] == 6
    resumed = router_of(tmp_path / "resumed")
    for name in two:
        assert torch.equal(resumed[name], two[name]), name


@pytest.mark.slow
def test_multirun_sweep_with_ddp_keeps_one_directory_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    sweep_args = ["-m", "router.top_p=0.5,0.9", "trainer=ddp_cpu", *steps(2), *FAST]
    result = run_cli(*sweep_args, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job, top_p in zip(jobs, (0.5, 0.9), strict=True):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["policy"]["top_p"] == top_p
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran in this job
    assert not (tmp_path / "outputs").exists()  # no rank wrote a directory of its own


@pytest.mark.slow
def test_torchrun_ranks_share_one_run_directory(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    launch = (torchrun, "--standalone", "--nproc-per-node=2", *TRAIN_CMD[1:])
    result = run_cli("trainer=ddp_cpu", *steps(2), *FAST, cmd=launch, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()
    assert run.name.startswith("torchrun-")
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


def test_run_id_follows_the_launcher(monkeypatch):
    for var in ("SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    started = run_id()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's static default: no shared id
    assert run_id() == started
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert run_id() == "torchrun-abc"
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a batch script's own step: runs one at a time
    assert run_id() == "torchrun-abc"
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert run_id() == "slurm-42.3"


@pytest.mark.parametrize(
    ("trainer", "strategy"),
    [
        ("cpu", None),
        ("gpu", None),
        ("ddp", DDPStrategy),
        ("ddp_cpu", DDPStrategy),
        ("fsdp", ModelParallelStrategy),
        pytest.param("deepspeed", DeepSpeedStrategy, marks=pytest.mark.slow),  # make venv-deepspeed
    ],
)
def test_trainer_configs_compose_and_build_their_strategy(tmp_path, trainer, strategy):
    cfg = compose_train(tmp_path, f"trainer={trainer}", "trainer.devices=4", "trainer.num_nodes=2")
    assert (cfg.trainer.devices, cfg.trainer.num_nodes) == (4, 2)
    if strategy is None:
        assert "strategy" not in cfg.trainer
        return
    built = instantiate(cfg.trainer.strategy)
    assert isinstance(built, strategy)
    if trainer == "fsdp":  # mesh: nodes replicate, GPUs within a node shard
        assert (built._data_parallel_size, built._tensor_parallel_size) == (2, 4)
    if trainer == "deepspeed":
        assert built.config["zero_optimization"]["stage"] == 2


def test_slurm_launcher_keys_follow_the_trainer(tmp_path):
    cfg = compose_train(
        tmp_path,
        "hydra/launcher=slurm",
        "trainer=ddp",
        "trainer.num_nodes=2",
        "hydra.launcher.partition=a100",
        "hydra.launcher.timeout_min=60",
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min) == ("a100", 60)
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)


@pytest.mark.slow
def test_estimate_memory_table(tmp_path):
    out = tmp_path / "memory.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dmoe_train.studies.estimate_memory",
            "--seq",
            "2048",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = {
        cells[0]: [float(c) for c in cells[1:]]
        for line in out.read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| layout")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert "16.26B parameters" in out.read_text()  # LLaDA2.0-mini's count
    ddp, fsdp = rows["DDP, 1 node x 8"], rows["FSDP, 1 node x 8"]
    assert ddp[0] == pytest.approx(16.26e9 * 2 / 1e9, abs=0.1)  # bf16 weights, replicated
    # an eighth of the base, two gathered layers and the gathered embedding and head (1.3 GB)
    assert fsdp[0] < ddp[0] / 3 and fsdp[3] < fsdp[2]  # checkpointing saves memory


def test_decoding_after_training_is_refused_under_sharded_strategies(tmp_path):
    cfg = compose_train(tmp_path, *TWO_RANKS["fsdp"], "evaluate_after=true", "trainer.max_steps=1")
    with pytest.raises(ValueError, match="evaluate_after=true decodes on rank 0 alone"):
        train(cfg)


def _compare_dirs(rank: int, init_file: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    try:
        check_same_output_dir(Path("outputs") / f"clock-of-rank-{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_with_different_run_directories_stop(tmp_path):
    with pytest.raises(Exception, match="paths.output_dir differs across ranks"):
        torch.multiprocessing.spawn(_compare_dirs, args=(str(tmp_path / "init"),), nprocs=2)
