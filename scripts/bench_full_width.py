"""Full-width LLaDA2.0-mini measurements on a 2-layer slice (`full_width_checkpoint.py`): the
memory of `load_model` in bfloat16, and end-to-end decode speed under block coresets of 8, 16,
32, 48 and 70 experts against token routing. Each case runs in a process of its own (a clean
peak), called by `bench.py`; `python scripts/bench_full_width.py --case load|decode DIR` runs one.
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

import torch

from dmoe_train.generate import generate
from dmoe_train.models import load_model
from dmoe_train.routing import RULES, RoutingPolicy

CORESETS = (8, 16, 32, 48, 70)  # 70: what token routing touches per block on the real model
PROMPTS, PROMPT_LEN, BLOCK = 1, 32, 32  # one sequence: the 157k-vocabulary head dominates


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def load_case(path: Path) -> dict:
    """Peak resident memory of `load_model(dtype=bfloat16)` against the weights it holds."""
    before = _status("VmRSS")  # torch and our modules imported
    began = time.perf_counter()
    model = load_model(path, dtype=torch.bfloat16)
    seconds = time.perf_counter() - began
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    peak = _status("VmHWM")
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
    generate(model, *args, cache=True)  # warm-up
    measured: dict[str, list[dict]] = {name: [] for name in policies}
    unique = {}
    for _ in range(rounds):
        for name, policy in policies.items():
            model.set_routing(policy)
            for t in times.values():
                t.clear()
            out = generate(model, *args, cache=True)
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


def run_all() -> dict:
    """Write the 2-layer slice to a temporary directory and run every case on it."""
    from full_width_checkpoint import write_full_width

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llada2-mini-2layer"
        write_full_width(path, layers=2)
        return {
            case: json.loads(
                subprocess.run(
                    [sys.executable, __file__, "--case", case, str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            for case in ("load", "decode")
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", choices=("load", "decode"), required=True)
    ap.add_argument("path", type=Path)
    args = ap.parse_args()
    result = load_case(args.path) if args.case == "load" else decode_case(args.path)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
