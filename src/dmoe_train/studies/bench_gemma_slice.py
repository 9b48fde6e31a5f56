"""DiffusionGemma 26B-A4B at full width on this CPU: a 2-layer slice of the published text config
(a sliding and a full attention layer, 128 experts of width 704, top-8, hidden 2816, the
262,144-token vocabulary; random bf16 weights written by transformers' `save_pretrained`) loaded
by `load_model` and decoded by transformers' `generate` (one 256-token canvas under a random
prompt) under token routing and under block coresets. Per policy: unique experts per block of 32
and per canvas (per decoder forward, mean over both layers), denoising forwards, tokens/s and the
process's peak resident memory (`loaded_GiB`: resident right after loading, the safetensors
still mapped lazily). At most `--steps` forwards per canvas: the experts a forward touches are
the measure, the speed is per forward; random routers spread over the experts more evenly than
trained ones do.
`python -m dmoe_train.studies.bench_gemma_slice --out bench` writes
`bench/gemma_slice.{md,json}`; `make bench` includes it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from dmoe_train.evaluation.canvas_decoding import CanvasDecoding
from dmoe_train.memory import resident_bytes
from dmoe_train.models import load_model
from dmoe_train.models.families.diffusion_gemma import text_only_config
from dmoe_train.objectives.expert_metrics import unique_experts_per_block
from dmoe_train.reports import markdown_table
from dmoe_train.routing import RoutingPolicy
from dmoe_train.studies.estimate_memory import CANVAS_26B, DIFFUSION_GEMMA_26B

SELF = (sys.executable, "-m", "dmoe_train.studies.bench_gemma_slice")
LAYERS = ["sliding_attention", "full_attention"]
BLOCK = 32
# token routing, then fixed pools and top-p coresets per block of 32
POLICIES = {
    "token": RoutingPolicy("token", block_size=BLOCK),
    "capacity_max c=16": RoutingPolicy("capacity_max", block_size=BLOCK, capacity=16),
    "capacity_max c=32": RoutingPolicy("capacity_max", block_size=BLOCK, capacity=32),
    "topp p=0.5": RoutingPolicy("topp", block_size=BLOCK, top_p=0.5, min_experts=8),
}


def write_slice(path: Path, seed: int = 0) -> Path:
    """The 2-layer slice as `save_pretrained` writes it: transformers' init, in bf16."""
    config = text_only_config(
        CANVAS_26B, **{**DIFFUSION_GEMMA_26B, "num_hidden_layers": 2, "layer_types": LAYERS}
    )
    torch.manual_seed(seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = DiffusionGemmaForBlockDiffusion(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(path)
    return path


@torch.no_grad()
def decode_case(path: Path, label: str, steps: int) -> dict:
    """One canvas under `label`'s policy, every decoder forward's experts counted."""
    model = load_model(path, dtype=torch.bfloat16, routing=POLICIES[label]).eval()
    loaded = resident_bytes("VmRSS")
    text = model.config.text_config
    prompt = torch.randint(3, text.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    decoding = CanvasDecoding(
        block_length=BLOCK, steps=steps, entropy_bound=0.1, t_max=0.8, t_min=0.4,
        stability_threshold=1, confidence_threshold=0.005, max_new_tokens=None, max_samples=1,
    )  # fmt: skip
    torch.manual_seed(0)
    began = time.perf_counter()
    with model.canvas_routing.recording() as records:
        out = model.generate(
            input_ids=prompt, **decoding.generate_kwargs(model.config.canvas_length)
        )
    seconds = time.perf_counter() - began
    decoder = [r for side, r in records if side == "decoder"]
    forwards = len(decoder) // text.num_hidden_layers
    per_block = torch.stack(
        [unique_experts_per_block(r.ids, BLOCK).float().mean() for r in decoder]
    )
    per_canvas = torch.stack(
        [unique_experts_per_block(r.ids, r.ids.shape[1]).float().mean() for r in decoder]
    )
    return {
        "policy": label,
        "experts_per_block": float(per_block.mean()),
        "experts_per_canvas": float(per_canvas.mean()),
        "forwards": forwards,
        "tokens": out.sequences.shape[1] - prompt.shape[1],
        "s_per_forward": seconds / max(forwards, 1),
        "tokens_per_s": (out.sequences.shape[1] - prompt.shape[1]) / seconds,
        "loaded_GiB": loaded / 2**30,
        "peak_GiB": resident_bytes() / 2**30,
    }


def run(steps: int) -> list[dict]:
    """Write the slice to a temporary directory; each policy decodes in a process of its own (a
    clean peak)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_slice(Path(tmp) / "diffusiongemma-2layer")
        return [
            json.loads(
                subprocess.run(
                    [*SELF, "--case", label, "--steps", str(steps), str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )  # fmt: skip
            for label in POLICIES
        ]


def report(rows: list[dict]) -> str:
    columns = ("policy", "experts_per_block", "experts_per_canvas", "forwards", "s_per_forward",
               "tokens_per_s", "loaded_GiB", "peak_GiB")  # fmt: skip
    body = [
        [f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows
    ]
    return markdown_table(columns, body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--steps", type=int, default=8, help="denoising forwards per canvas")
    ap.add_argument("--case", choices=sorted(POLICIES), help=argparse.SUPPRESS)
    ap.add_argument("path", type=Path, nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(decode_case(args.path, args.case, args.steps)))
        return
    rows = run(args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemma_slice.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = f"# DiffusionGemma 26B-A4B, a 2-layer full-width slice on CPU\n\n{report(rows)}\n"
    (args.out / "gemma_slice.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
