"""`dmoe-export`: base model + adapted router -> a complete model directory."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from dmoe_train.models import load_model
from dmoe_train.router_io import load_router, read_manifest
from dmoe_train.routing import RoutingPolicy


def check_servable(policy: RoutingPolicy) -> None:
    """What the serving engine of `policy`'s rule fixes or refuses, before anything is written."""
    if policy.rule == "llada22" and policy.block_size & (policy.block_size - 1):
        raise ValueError(
            f"router.block_size={policy.block_size}: SGLang's LLaDA2.2 routing needs a power of two"
        )
    if policy.rule == "dmoe" and (policy.block_size, policy.min_experts) != (32, 16):
        warnings.warn(
            f"dMoE's model code routes blocks of 32 with a guard of 16; this router was trained "
            f"with router.block_size={policy.block_size}, router.min_experts={policy.min_experts}",
            stacklevel=2,
        )


def export(router: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Load the base (default: the manifest's base path), apply the router and its routing
    settings, and save the published layout (`save_pretrained`) with the settings in
    `config.json`: our `routing` key and, for a published rule, the keys its engine reads."""
    base = base or read_manifest(router)["base_path"]
    model = load_model(base)
    load_router(model, router)
    check_servable(model.config.routing)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(base) / name).is_file():
            (Path(out) / name).write_bytes((Path(base) / name).read_bytes())
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--router", required=True, help="router.safetensors of a run")
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--base", help="base model directory (default: the one the router names)")
    args = ap.parse_args(argv)
    print(f"wrote {export(args.router, args.out, args.base)}")


if __name__ == "__main__":
    main()
