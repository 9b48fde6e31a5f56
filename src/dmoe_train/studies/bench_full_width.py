"""Full-width LLaDA2.0-mini measurements on a 2-layer slice (`full_width_checkpoint.py`): the
memory of `load_model` in bfloat16; end-to-end decode speed under block coresets of 8, 16, 32, 48
and 70 experts against token routing; and training through the shipped trainer configs (cpu,
ddp_cpu and fsdp with two CPU processes): each rank's peak resident memory once loaded and after
the steps, tokens per second, router-only against training the experts too, and the memory
estimate of `estimate_memory.py` beside the measurement. Each case runs in a process (or process
group) of its own, for a clean peak, called by `bench.py`;
`python -m dmoe_train.studies.bench_full_width --case load|decode DIR` runs one.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from dmoe_train.evaluation.sampler import decode_blocks
from dmoe_train.memory import resident_bytes
from dmoe_train.models import load_model
from dmoe_train.resolvers import composed
from dmoe_train.routing import RULES, RoutingPolicy
from dmoe_train.studies.estimate_memory import Layout, estimate, read_config
from dmoe_train.training.callbacks import StepResources
from dmoe_train.training.from_config import build_module, load_routed_model

SELF = (sys.executable, "-m", "dmoe_train.studies.bench_full_width")  # a case in its own process

CORESETS = (8, 16, 32, 48, 70)  # 70: what token routing touches per block on the real model
PROMPTS, PROMPT_LEN, BLOCK = 1, 32, 32  # one sequence: the 157k-vocabulary head dominates


def load_case(path: Path) -> dict:
    """Peak resident memory of `load_model(dtype=bfloat16)` against the weights it holds."""
    before = resident_bytes("VmRSS")  # torch and our modules imported
    began = time.perf_counter()
    model = load_model(path, dtype=torch.bfloat16)
    seconds = time.perf_counter() - began
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    peak = resident_bytes("VmHWM")
    return {
        "weights_GiB": round(weights / 2**30, 3),
        "process_before_GiB": round(before / 2**30, 3),
        "peak_GiB": round(peak / 2**30, 3),
        "load_peak_vs_weights": round((peak - before) / weights, 3),
        "process_peak_vs_weights": round(peak / weights, 3),
        "load_s": round(seconds, 1),
    }


def _layer_timers(model: torch.nn.Module) -> dict[str, list[float]]:
    """Wall seconds per call of each decoder layer and of each MoE block (forward hooks)."""
    times: dict[str, list[float]] = {}
    named = [(f"layer{i}", m) for i, m in enumerate(model.model.layers)]
    named += [
        (f"moe{i}", m.mlp) for i, m in enumerate(model.model.layers) if hasattr(m.mlp, "gate")
    ]
    for name, module in named:
        times[name] = []
        start: list[float] = []
        module.register_forward_pre_hook(lambda *a, s=start: s.append(time.perf_counter()))
        module.register_forward_hook(
            lambda *a, s=start, t=times[name]: t.append(time.perf_counter() - s.pop())
        )
    return times


def decode_case(path: Path, rounds: int = 3) -> list[dict]:
    """One block of 32 tokens (32 steps, greedy, prefix cache) after a 32-token prompt, under
    token routing and LLaDA2.2-style pools of each size: tokens per second, the MoE layer's
    time, and a 20-layer projection from the measured layer times. After a warm-up decode, the
    policies are timed in interleaved rounds (each round decodes under every policy in turn) and
    each figure is the median over rounds, so drifts of the machine's speed hit all alike."""
    model = load_model(path, dtype=torch.bfloat16)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 150000, (PROMPTS, PROMPT_LEN), generator=g).tolist()
    policies = {"token": RoutingPolicy("token", block_size=BLOCK)}
    for c in CORESETS:
        policies[f"coreset {c}"] = RoutingPolicy(
            "capacity_max", block_size=BLOCK, capacity=c, **RULES["llada22"]
        )
    times = _layer_timers(model)
    args = (prompts, BLOCK, BLOCK, BLOCK, cfg.mask_token_id, -1)  # no eos: the whole block
    decode_blocks(model, *args, cache=True)  # warm-up
    measured: dict[str, list[dict]] = {name: [] for name in policies}
    unique = {}
    for _ in range(rounds):
        for name, policy in policies.items():
            model.set_routing(policy)
            for t in times.values():
                t.clear()
            out = decode_blocks(model, *args, cache=True)
            forwards = out.unique_experts.shape[0]
            layer = {k: sum(v) / forwards for k, v in times.items()}  # s per decoding forward
            measured[name].append({"forward": out.seconds / forwards, **layer})
            unique[name] = float(out.per_sample(out.unique_experts).mean())
    rows = []
    for name, runs in measured.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rest = med["forward"] - med["layer0"] - med["layer1"]  # embedding, final norm, lm_head
        rows.append(
            {
                "routing": name,
                "unique_experts": round(unique[name], 1),
                "tokens_per_s": round(PROMPTS / med["forward"], 2),  # one token per step
                "forward_ms": round(med["forward"] * 1e3, 1),
                "moe_ms": round(med["moe1"] * 1e3, 1),
                "moe_share": round(med["moe1"] / med["forward"], 3),
                # LLaDA2.0-mini: the same embedding and head, one dense layer, 19 MoE layers
                "projected_20_layer_ms": round(
                    (rest + med["layer0"] + 19 * med["layer1"]) * 1e3, 1
                ),
            }
        )
    token = rows[0]
    for row in rows:
        row["speed_vs_token"] = round(row["tokens_per_s"] / token["tokens_per_s"], 2)
        row["moe_speed_vs_token"] = round(token["moe_ms"] / row["moe_ms"], 2)
        row["projected_speed_vs_token"] = round(
            token["projected_20_layer_ms"] / row["projected_20_layer_ms"], 2
        )
    return rows


# (trainer config, what trains); the cpu case of each trainable set first (the one-process peak)
TRAIN_CASES = (
    ("cpu", "router"),
    ("ddp_cpu", "router"),
    ("fsdp", "router"),
    ("cpu", "router+experts"),
    ("ddp_cpu", "router+experts"),
    ("fsdp", "router+experts"),
)
# A case runs only when its ranks fit the machine's available memory: each rank the estimate
# with a margin (measured added/estimate at full width: 1.01-1.15) over a fresh process's 0.5 GiB.
# The two-rank router+experts cases need about 37 and 35 GiB: a 24 GiB machine skips them (an
# FSDP attempt was OOM-killed at 13.0 GiB on rank 0 and 12.5 on rank 1).
MEMORY_MARGIN, PROCESS_BYTES = 1.1, 0.5 * 2**30
TRAIN_SEQ, TRAIN_STEPS = 64, 3  # per rank: one sequence of 64 tokens ([x_t ; x_0]: 128)


def train_case(path: Path, trainer_name: str, trainable: str, out: Path) -> None:
    """A few training steps on the slice through the shipped configs (trainer=<name> on the
    CPU, the model, module and router as `dmoe-train` builds them); each rank's
    `StepResources` writes its figures to `out`. Lightning launches the other rank by running
    this command again."""
    overrides = [
        f"paths.output_dir={out}",
        "model=llada2_mini",
        f"model.path={path}",
        f"trainer={trainer_name}",
        "trainer.accelerator=cpu",
        f"trainer.devices={1 if trainer_name == 'cpu' else 2}",
        "trainer.precision=32-true",  # the base computes in its bf16, the trainable set in fp32
        "trainer.deterministic=false",
        f"trainer.max_steps={TRAIN_STEPS}",
        "+trainer.enable_checkpointing=false",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "router.block_size=32",
        f"module.trainable={trainable}",
    ]
    cfg = composed("train", overrides)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[StepResources(str(out))], logger=False)
    model = load_routed_model(cfg, instantiate(cfg.router), trainer)
    module = build_module(cfg, model)
    g = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(0, model.config.vocab_size, (1, TRAIN_SEQ), generator=g),
            "response_mask": torch.ones(1, TRAIN_SEQ, dtype=torch.bool),
            "index": torch.tensor([i]),
        }
        for i in range(TRAIN_STEPS)
    ]
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))


def available_bytes() -> int:
    """Memory the kernel could hand out now without swapping (Linux's MemAvailable)."""
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024


def train_rows(path: Path, cases: tuple[tuple[str, str], ...] = TRAIN_CASES) -> list[dict]:
    """Every training case in its own process group: each rank's peak memory (once loaded, and
    after the steps) against one process, tokens per second, and the estimate of
    `estimate_memory.py` for the layout (its activations for one sequence of TRAIN_SEQ). A case
    whose ranks would not fit the machine's memory is a row saying so, with what it needs."""
    cfg = read_config(path)
    rows, alone = [], {}
    for trainer_name, trainable in cases:
        ranks = 1 if trainer_name == "cpu" else 2
        layout = Layout(trainer_name, 2 if trainer_name == "fsdp" else 1, trainer_name == "ddp_cpu")
        estimated = estimate(cfg, TRAIN_SEQ, 1, layout, trainable)["total"]
        case = {"model": path.name, "trainer": trainer_name, "trainable": trainable}
        need = ranks * (estimated * MEMORY_MARGIN + PROCESS_BYTES)
        if need > available_bytes():
            rows.append(
                case
                | {
                    "rank": f"- of {ranks}",
                    "estimate_GiB": round(estimated / 2**30, 2),
                    "skipped": f"needs ~{need / 2**30:.0f} GiB, "
                    f"{available_bytes() / 2**30:.0f} GiB available",
                }
            )
            continue
        with tempfile.TemporaryDirectory() as out:
            cmd = [*SELF, "--case", "train", str(path)]
            cmd += ["--trainer", trainer_name, "--trainable", trainable, "--out", out]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            ranks_out = [json.loads(f.read_text()) for f in sorted(Path(out).glob("resources.*"))]
        for r in ranks_out:
            peak = r["peak_bytes"] / 2**30
            alone.setdefault(trainable, peak)  # the cpu case of each trainable set comes first
            rows.append(
                case
                | {
                    "rank": f"{r['rank']} of {r['world_size']}",
                    "tokens_per_s": round(r["tokens_per_s"], 1),
                    "step_s": round(r["step_s"], 2),
                    "loaded_peak_GiB": round(r["loaded_peak_bytes"] / 2**30, 2),
                    "peak_GiB": round(peak, 2),
                    "peak_vs_one_process": round(peak / alone[trainable], 2),
                    "start_GiB": round(r["start_rss_bytes"] / 2**30, 2),
                    "estimate_GiB": round(estimated / 2**30, 2),
                    # what the run added to the process, against the estimate of what it holds
                    "added_vs_estimate": round(
                        (r["peak_bytes"] - r["start_rss_bytes"]) / estimated, 2
                    ),
                }
            )
    return rows


def run_all() -> dict:
    """Write the 2-layer slice to a temporary directory and run every case on it."""
    from dmoe_train.studies.full_width_checkpoint import write_full_width

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llada2-mini-2layer"
        write_full_width(path, layers=2)
        results = {
            case: json.loads(
                subprocess.run(
                    [*SELF, "--case", case, str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            for case in ("load", "decode")
        }
        return results | {"train": train_rows(path)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", choices=("load", "decode", "train"), required=True)
    ap.add_argument("path", type=Path)
    ap.add_argument("--trainer", choices=sorted({t for t, _ in TRAIN_CASES}), default="cpu")
    ap.add_argument("--trainable", default="router")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.case == "train":
        train_case(args.path, args.trainer, args.trainable, args.out)
        return
    result = load_case(args.path) if args.case == "load" else decode_case(args.path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
