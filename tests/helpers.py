"""What tests share: composing and launching runs, reading their routers, and test-only
callbacks that configs name by `_target_` (tests/ is on sys.path under pytest)."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from dmoe_train.cli.common import (  # (registers the resolvers)
    ASSETS,
    PROJECT_ROOT,  # noqa: F401 (tests import it from here)
)
from dmoe_train.cli.common import CONFIG_DIR as CONFIGS  # (registers the resolvers)
from dmoe_train.models import is_router_param, load_model
from dmoe_train.models.adapted_weights import adapted_manifest, save_adapted
from dmoe_train.routing import MoeSpec, RoutingPolicy

TINY_BASE = ASSETS / "tiny-llada2"  # the shipped base (assets/ links to it)
TRAIN_CMD = (sys.executable, "-m", "dmoe_train.cli.train")  # what `dmoe-train` runs

FAST = [
    "data.train_size=512",
    "data.val_size=64",
    "data.eval_batch_size=64",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def steps(n: int, checkpoint_every: int | None = None) -> list[str]:
    """Overrides for a run of `n` optimizer steps, validated once at its end, with a
    checkpoint every `checkpoint_every` steps (default: the config's)."""
    out = [f"trainer.max_steps={n}", f"trainer.val_check_interval={n}"]
    if checkpoint_every:
        out.append(f"callbacks.model_checkpoint.every_n_train_steps={checkpoint_every}")
    return out


def run_cli(
    *args: str, cmd: tuple[str, ...] = TRAIN_CMD, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """`cmd` (default `dmoe-train`) with `args` in a subprocess, tests/ importable for callbacks."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run(
        [*cmd, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def cli_train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """A short `dmoe-train` run in `output_dir`."""
    return run_cli(f"hydra.run.dir={output_dir}", *FAST, *overrides)


def router_of(run_dir: Path) -> dict[str, torch.Tensor]:
    """The router checkpoint a run wrote."""
    return load_file(run_dir / "checkpoints" / "router.safetensors")


def compose_train(
    output_dir: Path, *overrides: str, return_hydra_config: bool = False, fast: bool = True
) -> DictConfig:
    """The `dmoe-train` config, shrunk to the `FAST` sizes unless `fast=False`."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", *(FAST if fast else []), *overrides],
            return_hydra_config=return_hydra_config,
        )


def compose_generate(out_dir: Path, *overrides: str) -> DictConfig:
    """The `dmoe-generate` config writing into `out_dir`, on small splits."""
    small = ["data.train_size=64", "data.val_size=16", "data.test_size=16", "shard_size=16"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "generate",
            [f"paths.output_dir={out_dir}", f"out_dir={out_dir}", *small, *overrides],
        )


def hashes(directory: Path) -> dict[str, str]:
    """Every file under `directory` (relative path -> sha256): what a refusal must not touch."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_main(main, *args: str) -> int:
    """A Hydra command's `main` in this process with `args` as its command line; its exit code
    (0 when it returns)."""
    argv = sys.argv
    sys.argv = ["dmoe", *args]
    try:
        main()
        return 0
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


class InterruptAtStep(L.Callback):
    """Simulates a SIGTERM once `step` optimizer steps are done (one step or a list), as
    Lightning's own handler does (a run resumed at a step passes it: relaunch with the same
    overrides)."""

    def __init__(self, step: int | Sequence[int]) -> None:
        self.steps = {step} if isinstance(step, int) else set(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            raise SIGTERMException


class PoisonRouter(L.Callback):
    """Sets every router weight to NaN before the batch of step `step` (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for name, p in pl_module.model.named_parameters():
                if name.endswith("gate.weight"):
                    p.data.fill_(float("nan"))


class KillAtStep(L.Callback):
    """Sends this process `signal` (SIGTERM, SIGINT or SIGKILL) once `step` optimizer steps are
    done, in a run that did not resume (its relaunch passes the same overrides)."""

    def __init__(self, step: int, signal: str) -> None:
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            if self.signal == "SIGINT":  # as a terminal's Ctrl-C finds it: a job started in the
                # background of a shell inherits SIGINT ignored, and would never see it
                signal.signal(signal.SIGINT, signal.default_int_handler)
            os.kill(os.getpid(), getattr(signal, self.signal))
            # Ctrl-C raises where Python next checks for signals: wait for it here, inside this
            # step, or a late delivery could land after the run's last step
            deadline = time.monotonic() + 60
            while self.signal == "SIGINT" and time.monotonic() < deadline:
                time.sleep(0.01)


class PoisonOneBatch(L.Callback):
    """Makes one batch's loss NaN (router weights NaN during that batch only)."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.saved is None:
            gates = [p for n, p in pl_module.model.named_parameters() if n.endswith("gate.weight")]
            self.saved = [(p, p.detach().clone()) for p in gates]
            for p in gates:
                p.data.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for p, value in self.saved or []:
            p.data.copy_(value)
        self.saved = self.saved and []


class SaveRankRouter(L.Callback):
    """Each rank saves its (whole) router at the end of training to `<dirpath>/rank<r>.pt`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        state = pl_module.trainable_state()  # a collective under FSDP: every rank calls it
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")


class RecordTopP(L.Callback):
    """Records the top_p each training batch ran under (a curriculum moves it)."""

    seen: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        RecordTopP.seen.append(pl_module.model.config.routing.top_p)


def moe_spec(scores: torch.Tensor, top_k: int, **settings) -> MoeSpec:
    """The MoE layer routing sees, for scores `[..., E]` of a hand-computed case."""
    return MoeSpec(num_experts=scores.shape[-1], top_k=top_k, expert_width=1, **settings)


# a tiny LLaDA2-MoE config and checkpoints written as the published ones are
TINY = dict(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    first_k_dense_replace=1,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    pad_token_id=0,
    tie_word_embeddings=False,
    model_type="llada2_moe",
    architectures=["LLaDA2MoeModelLM"],
    use_qkv_bias=False,
)


def published_tensors(cfg: dict, merged: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the published LLaDA2 checkpoints are (fact sheet)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    h, hd = cfg["hidden_size"], cfg["head_dim"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    e, mi = cfg["num_experts"], cfg["moe_intermediate_size"]
    t = {
        "model.word_embeddings.weight": rand(cfg["vocab_size"], h),
        "model.norm.weight": 1 + rand(h),
        "lm_head.weight": rand(cfg["vocab_size"], h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {
            p + "input_layernorm.weight": 1 + rand(h),
            p + "post_attention_layernorm.weight": 1 + rand(h),
            p + "attention.query_key_value.weight": rand(qkv, h),
            p + "attention.query_layernorm.weight": 1 + rand(hd),
            p + "attention.key_layernorm.weight": 1 + rand(hd),
            p + "attention.dense.weight": rand(h, cfg["num_attention_heads"] * hd),
        }
        if n < cfg["first_k_dense_replace"]:
            i = cfg["intermediate_size"]
            t |= {
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
            }
            continue
        t |= {
            p + "mlp.gate.weight": rand(e, h),
            p + "mlp.gate.expert_bias": rand(e),
            p + "mlp.shared_experts.gate_proj.weight": rand(mi, h),
            p + "mlp.shared_experts.up_proj.weight": rand(mi, h),
            p + "mlp.shared_experts.down_proj.weight": rand(h, mi),
        }
        experts = {
            "gate_proj": rand(e, mi, h),
            "up_proj": rand(e, mi, h),
            "down_proj": rand(e, h, mi),
        }
        for proj, stack in experts.items():
            if merged:
                t[f"{p}mlp.experts.{proj}"] = stack
            else:
                t |= {f"{p}mlp.experts.{x}.{proj}.weight": stack[x].clone() for x in range(e)}
    return t


def write_published(path: Path, cfg: dict, tensors: dict, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, path / file)
        weight_map |= dict.fromkeys(part, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def perturbed_router(base: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A router checkpoint of `base` whose gates moved far from the base's (as training moves
    them), saved in fp32 under top-p routing."""
    model = load_model(base, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        if is_router_param(name):
            moved = p.detach().float()
            if name.endswith("gate.weight"):
                moved = moved + torch.randn(moved.shape, generator=gen)
            tensors[name] = moved
    model.set_routing(RoutingPolicy("topp", block_size=8, top_p=0.5, min_experts=4))
    return save_adapted(tensors, out, adapted_manifest(model, base_path=str(base)))


def tiny_gemma_dir(path: Path, experts: int = 16, k: int = 4, seed: int = 0) -> Path:
    """A DiffusionGemma model directory (transformers' class, random weights, a canvas of 64 in
    blocks of 32) with the character tokenizer: what `model=tiny_gemma model.path=...` reads."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from dmoe_train.data.tokenizer import char_tokenizer
    from dmoe_train.models.families.diffusion_gemma import text_only_config

    tokenizer = char_tokenizer()
    config = text_only_config(
        64, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
        num_experts=experts, top_k_experts=k, moe_intermediate_size=16, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=0,
        bos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    DiffusionGemmaForBlockDiffusion(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fake_metrics(experts: float, hits: int, n: int = 100) -> dict:
    """What a study's evaluation returns, for `hits` of `n` prompts right."""
    correct = [1] * hits + [0] * (n - hits)
    return {
        "unique_experts_per_block": experts,
        "correct": correct,
        "policy": {"name": "topp", "block_size": 32},
        "forwards_per_block": 2.0,
        "expert_bytes_per_generated_token": 100.0 * experts,
    }
