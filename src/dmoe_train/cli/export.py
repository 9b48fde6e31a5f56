"""`dmoe-export`: base model + adapted router -> a complete model directory."""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from pathlib import Path

import torch

from dmoe_train.cli.common import exit_on_error_cli
from dmoe_train.files import disk_full, file_mode, no_space, save_safetensors, write_json
from dmoe_train.models import load_model
from dmoe_train.models.adapted_weights import EXPORT_MARKER, load_adapted, read_manifest
from dmoe_train.models.families.diffusion_gemma import save_with_routing
from dmoe_train.models.lora import ADAPTER, has_expert_lora, merge_expert_lora, peft_adapter_state
from dmoe_train.models.routing_control import is_canvas_model, policy_of
from dmoe_train.models.trainable import is_router_param
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


def check_out_dir(out: Path, base: Path, flag: str = "--out") -> None:
    """A directory to write (`flag` names it) must be new, empty or an earlier export, and never
    hold the base."""
    if out.resolve() == base.resolve() or out.resolve() in base.resolve().parents:
        raise ValueError(f"{flag} {out}: holds the base model {base}; write the export elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag} {out}: a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ValueError(
            f"{flag} {out}: not empty and not an earlier dmoe-export (no {EXPORT_MARKER}); "
            "give a new or empty directory"
        )


def save_adapter(model: torch.nn.Module, out: Path, record: dict) -> Path:
    """peft's adapter directory of a model with expert adapters: `adapter_config.json` and
    `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes them, and `record` (the
    export's router and base) as `EXPORT_MARKER`."""
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config[ADAPTER].save_pretrained(out)
    save_safetensors(
        peft_adapter_state(model), out / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    write_json(out / EXPORT_MARKER, record)
    return out


def export(
    router: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    adapter_out: str | Path | None = None,
) -> Path:
    """Load the base (default: the manifest's base path), apply the router and its routing
    settings, and save the published layout (`save_pretrained`) with the settings in
    `config.json`: our `routing` key and, for a published rule, the keys its engine reads.
    Expert adapters (a `+lora` run) are merged into the experts, so engines load the directory
    unchanged; `adapter_out` also writes them as peft's adapter directory. The router stays in
    the dtype it was trained in (fp32 beside a bf16 base). Written beside `out` and renamed into
    place: an earlier export is replaced only once the new one is whole."""
    manifest = read_manifest(router)
    base, out = Path(base or manifest["base_path"]), Path(out)
    check_out_dir(out, base)
    if adapter_out is not None:
        if not manifest.get("lora"):
            raise ValueError(f"--adapter-out {adapter_out}: router {router} trained no adapters")
        check_out_dir(Path(adapter_out), base, "--adapter-out")
    model = load_model(base)
    load_adapted(model, router)
    check_servable(policy_of(model))
    # what dmoe-eval reads to measure an export against its base
    record = {
        "router": str(router),
        "base": str(base),
        "base_fingerprint": manifest["base_fingerprint"],
    }
    if has_expert_lora(model):
        if adapter_out is not None:
            save_adapter(model, Path(adapter_out), record)
        merge_expert_lora(model)
    staged, old = (out.with_name(f".{out.name}.{kind}") for kind in ("staged", "replaced"))
    shutil.rmtree(staged, ignore_errors=True)
    try:
        (save_with_routing if is_canvas_model(model) else type(model).save_pretrained)(
            model, staged
        )
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (base / name).is_file():
                shutil.copyfile(base / name, staged / name)
        dtypes = {str(p.dtype) for n, p in model.named_parameters() if is_router_param(n)}
        write_json(staged / EXPORT_MARKER, {**record, "router_dtype": sorted(dtypes)})
        for path in staged.iterdir():  # transformers writes its safetensors 0600
            path.chmod(file_mode())
    except Exception as err:
        full = disk_full(err, staged.parent)
        shutil.rmtree(staged, ignore_errors=True)
        if full:
            raise no_space(out, "the previous export") from err
        raise
    if out.exists():  # the old export waits beside until the new one is in place
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--router", required=True, help="router.safetensors of a run")
    ap.add_argument("--out", required=True, help="directory to write (empty, or an export)")
    ap.add_argument("--base", help="base model directory (default: the one the router names)")
    ap.add_argument("--adapter-out", help="also write a +lora run's adapters as peft's directory")
    args = ap.parse_args(argv)

    def run() -> None:
        print(f"wrote {export(args.router, args.out, args.base, args.adapter_out)}")
        if args.adapter_out:
            print(f"wrote {args.adapter_out} (peft's adapter directory)")

    exit_on_error_cli(run)


if __name__ == "__main__":
    main()
