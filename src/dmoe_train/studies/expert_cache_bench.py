"""`make bench-cache`: LLaDA2.0-mini-shaped weights (`full_width_checkpoint.py`, random, bf16)
decoded from their files with the routed experts left there and C resident per MoE layer
(`load_model(expert_cache=C)`, the disk store), against all of them loaded: per routing rule and
C, tokens per second, forwards per block, expert bytes loaded per block and per generated token,
cache hits within and across blocks, resident expert bytes and the process's peak memory. Each C
runs in a process of its own (a clean peak). Writes `bench/expert_cache.{md,json}`.

`--layers 20` is LLaDA2.0-mini's depth (about 32 GB of weights: all experts loaded does not fit a
24 GB machine, so that row reads "does not fit"); the default 2-layer slice fits both ways.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dmoe_train.evaluation.sampler import decode_blocks
from dmoe_train.evaluation.split_decoding import cache_metrics
from dmoe_train.memory import resident_bytes
from dmoe_train.models import load_model
from dmoe_train.models.expert_cache import CacheStats, resident_caches
from dmoe_train.routing import RULES, RoutingPolicy
from dmoe_train.studies.bench import table
from dmoe_train.studies.bench_full_width import BLOCK, PROMPT_LEN, PROMPTS, available_bytes
from dmoe_train.studies.full_width_checkpoint import write_full_width

SELF = (sys.executable, "-m", "dmoe_train.studies.expert_cache_bench")  # one size per process

# decoding with the routed experts in the files (`load_model(expert_cache=C)`, the disk store):
# C resident per MoE layer, or all of them loaded; two blocks of 32, so hits across blocks count
CACHE_SIZES = ("16", "32", "64", "256", "all")
CACHE_POLICIES = {
    "token": RoutingPolicy("token", block_size=BLOCK),
    **{
        f"llada22 pool {c}": RoutingPolicy(
            "capacity_max", block_size=BLOCK, capacity=c, **RULES["llada22"]
        )
        for c in (16, 32, 48)
    },
    "dmoe top-p 0.6": RoutingPolicy("topp", block_size=BLOCK, top_p=0.6, **RULES["dmoe"]),
}


def cache_case(path: Path, size: str, steps: int) -> list[dict]:
    """Every `CACHE_POLICIES` decode (2 blocks, `steps` forwards each) with `size` experts
    resident per layer (a fresh cache for each), in one process: its peak resident memory is this
    size's."""
    capacity = None if size == "all" else int(size)
    model = load_model(path, dtype=torch.bfloat16, expert_cache=capacity)
    loaded = resident_bytes("VmHWM")
    g = torch.Generator().manual_seed(0)
    vocab = min(model.config.vocab_size, 150000)  # LLaDA2's special ids sit above 150000
    prompts = torch.randint(0, vocab, (PROMPTS, PROMPT_LEN), generator=g).tolist()
    args = (prompts, 2 * BLOCK, BLOCK, steps, model.config.mask_token_id, -1)
    rows = []
    for name, policy in CACHE_POLICIES.items():
        model.set_routing(policy)
        for cache in resident_caches(model):
            cache.slot_of.clear()
            cache.stats = CacheStats()
        out = decode_blocks(model, *args, cache=True)
        tokens = PROMPTS * 2 * BLOCK
        row = {
            "routing": name,
            "expert_cache": size,
            "unique_experts": round(float(out.per_sample(out.unique_experts).mean()), 1),
            "forwards_per_block": out.unique_experts.shape[0] / out.blocks,
            "tokens_per_s": round(tokens / out.seconds, 2),
            "loaded_peak_GiB": round(loaded / 2**30, 2),
            # the decoded tokens, to compare against every expert loaded
            "tokens": hashlib.sha256(out.tokens.numpy().tobytes()).hexdigest()[:12],
        }
        metrics = cache_metrics(model, out.blocks, tokens).to_dict()
        row["peak_GiB"] = round(metrics["peak_rss_bytes"] / 2**30, 2)
        # the peak counts the pages of the memory-mapped safetensors the reads touched (page
        # cache the kernel can take back); anonymous memory now is what the process holds
        row["anon_GiB"] = round(resident_bytes("RssAnon") / 2**30, 2)
        if capacity is not None:
            row |= {
                "loaded_MB_per_block": round(metrics["expert_bytes_loaded_per_block"] / 2**20, 1),
                "loaded_MB_per_token": round(metrics["expert_bytes_loaded_per_token"] / 2**20, 2),
                "hits_within_block": round(metrics["cache_hits_within_block"], 3),
                "hits_across_blocks": round(metrics["cache_hits_across_blocks"], 3),
                "resident_expert_GiB": round(metrics["peak_resident_expert_bytes"] / 2**30, 3),
            }
        rows.append(row)
    return rows


def cache_rows(path: Path, weights: int, sizes: list[str], steps: int) -> list[dict]:
    """`cache_case` for every size, each in its own process; a size runs only when what it could
    hold resident (every expert, for `all`; else its share of them, as the experts are nearly
    all of the weights) fits the memory available with 10% to spare, else a row says so."""
    experts = json.loads((path / "config.json").read_text())["num_experts"]
    rows = []
    for size in sizes:
        needs = weights if size == "all" else weights * min(int(size) / experts, 1.0)
        if needs * 1.1 > available_bytes():
            avail = available_bytes() / 2**30
            rows += [
                {"routing": name, "expert_cache": size, "skipped": f"{needs / 2**30:.1f} GiB "
                 f"of weights do not fit {avail:.1f} GiB available"}
                for name in CACHE_POLICIES
            ]  # fmt: skip
            continue
        done = subprocess.run(
            [*SELF, "--size", size, "--steps", str(steps), str(path)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each cached row against the same rule with every expert loaded: peak memory and speed."""
    loaded = {r["routing"]: r for r in rows if r["expert_cache"] == "all" and "peak_GiB" in r}
    out = []
    for r in rows:
        ref = loaded.get(r["routing"])
        if r["expert_cache"] == "all" or ref is None:
            continue
        out.append({
            "routing": r["routing"], "expert_cache": r["expert_cache"],
            "peak_memory_vs_all_loaded": round(r["peak_GiB"] / ref["peak_GiB"], 3),
            "speed_vs_all_loaded": round(r["tokens_per_s"] / ref["tokens_per_s"], 3),
            "same_tokens": r["tokens"] == ref["tokens"],
        })  # fmt: skip
    return out


def against_token(rows: list[dict], weights_gib: float) -> list[dict]:
    """Each block rule against token routing at the same cache size (expert bytes loaded per
    block), and the process's peak against the all-resident model's weights."""
    token = {r["expert_cache"]: r for r in rows if r["routing"] == "token" and "peak_GiB" in r}
    return [
        {
            "routing": r["routing"], "expert_cache": r["expert_cache"],
            "unique_experts": r["unique_experts"],
            "loaded_vs_token": round(r["loaded_MB_per_block"] / t["loaded_MB_per_block"], 3),
            "peak_vs_all_weights": round(r["peak_GiB"] / weights_gib, 3),
        }  # fmt: skip
        for r in rows
        if r["routing"] != "token" and "loaded_MB_per_block" in r
        and (t := token.get(r["expert_cache"])) is not None
    ]  # fmt: skip


def report(result: dict) -> str:
    """`expert_cache.md`: the rows, the ratios to token routing and to every expert loaded."""
    rows = result["rows"]
    loaded = ratios(rows)
    return "\n".join([
        f"# Decoding with the experts in the files ({result['layers']} layers at full width, "
        f"{result['weights_GiB']} GiB of bf16 weights; `make bench-cache`): "
        f"{result['prompts']} prompt, {result['blocks']} blocks of {BLOCK}, "
        f"{result['steps_per_block']} forwards each\n",
        table(rows), "",
        "## Against token routing at the same cache size, and the weights\n",
        table(against_token(rows, result["weights_GiB"])), "",
        "## Against every expert loaded\n",
        table(loaded) if loaded else "- (every expert loaded does not fit)", "",
    ])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=2, help="of the directory written (no --dir)")
    ap.add_argument("--dir", type=Path, help="an existing full-width directory (else written)")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--sizes", nargs="+", default=list(CACHE_SIZES), choices=CACHE_SIZES)
    ap.add_argument("--steps", type=int, default=BLOCK, help="denoising forwards per block")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    ap.add_argument("--size", help=argparse.SUPPRESS)  # one size, in this process
    ap.add_argument("path", type=Path, nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.size:
        print(json.dumps(cache_case(args.path, args.size, args.steps)))
        return
    stored = args.out / "expert_cache.json"
    if args.report_only:
        result = json.loads(stored.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.dir or Path(tmp) / f"llada2-mini-{args.layers}layer"
            if args.dir is None:
                write_full_width(path, layers=args.layers)
            weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
            rows = cache_rows(path, weights, args.sizes, args.steps)
        result = {
            "layers": layers, "weights_GiB": round(weights / 2**30, 2), "prompts": PROMPTS,
            "blocks": 2, "steps_per_block": args.steps, "rows": rows,
        }  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(result, indent=2) + "\n")
    md = report(result)
    (args.out / "expert_cache.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
