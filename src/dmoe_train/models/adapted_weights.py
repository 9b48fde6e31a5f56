"""Adapted weights: what a run trained (the router, and whatever else its trainable set holds:
shared experts, adapters, routed experts), saved as `router.safetensors` (the adapted tensors
only; the name is kept from when only routers trained) + `router.json` (the manifest).

Adapted weights only make sense on the base they were trained from: the manifest keeps the base
path and a fingerprint of its config and of a few base tensors, and loading refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor

from dmoe_train.files import atomic_write, save_safetensors, write_json
from dmoe_train.models.lora import ExpertLora, add_expert_lora, has_expert_lora
from dmoe_train.models.routing_control import is_canvas_model, policy_of, set_policy
from dmoe_train.models.sharding import full_tensor
from dmoe_train.models.trainable import is_router_param
from dmoe_train.routing import ENGINE_KEYS, RoutingPolicy

ADAPTED_FILE = "router.safetensors"
MANIFEST_FILE = "router.json"
# what `dmoe-export` writes into every export: its router, its base and the base's fingerprint
EXPORT_MARKER = "dmoe_export.json"


def base_fingerprint(model: nn.Module) -> str:
    """Hash of the architecture config (not the routing nor its engine keys), the final norm's
    weights and the first two embedding rows. A collective under FSDP (every rank calls it;
    rank 0's is the one saved: its shard of the embedding starts at row 0)."""
    ignored = ("routing", "torch_dtype", "dtype", "transformers_version", *ENGINE_KEYS)
    arch = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in ignored and not k.startswith("_")
    }
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    embedding = model.get_input_embeddings().weight
    rows = (embedding.to_local() if isinstance(embedding, DTensor) else embedding)[:2]
    norm = model.model.decoder.norm if is_canvas_model(model) else model.model.norm
    for tensor in (full_tensor(norm.weight), rows):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def adapted_manifest(model: nn.Module, fingerprint: str | None = None, **fields) -> dict:
    """What adapted weights record about its base (`fingerprint`: the base's, taken before
    training; default: the model's now) and routing, plus `fields`."""
    return {
        **fields,
        "base_fingerprint": fingerprint or base_fingerprint(model),
        "routing": policy_of(model).to_dict(),
    }


def save_adapted(tensors: dict[str, torch.Tensor], directory: str | Path, manifest: dict) -> Path:
    """Write `tensors` (names as in the model) and the manifest (`adapted_manifest`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    full = {**manifest, "tensors": sorted(tensors)}
    atomic_write(directory / ADAPTED_FILE, lambda p: save_safetensors(tensors, p))
    write_json(directory / MANIFEST_FILE, full)
    return directory / ADAPTED_FILE


def changes_routed_experts(manifest: dict) -> bool:
    """Whether adapted weights (their manifest) carry routed-expert tensors or adapters:
    then the base's files no longer hold the experts it decodes with."""
    return any(".mlp.experts" in name for name in manifest["tensors"])


def export_base(model_dir: str | Path) -> tuple[Path, str] | None:
    """The base directory and base fingerprint an export (`EXPORT_MARKER`) was made from; None
    for a directory that is not an export."""
    marker = Path(model_dir) / EXPORT_MARKER
    if not marker.is_file():
        return None
    record = json.loads(marker.read_text())
    return Path(record["base"]), record.get("base_fingerprint", "")


def read_manifest(router_file: str | Path) -> dict:
    path = Path(router_file).with_name(MANIFEST_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"router checkpoint {router_file}: no {MANIFEST_FILE} beside it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"router manifest {path}: not valid JSON ({err})") from err


def load_adapted(
    model: nn.Module, router_file: str | Path, routing: RoutingPolicy | None = None
) -> dict:
    """Copy adapted weights into `model` and route by `routing` (default: the policy it was
    trained under); returns the manifest. A `routing` under another rule than the training one
    warns once, naming both."""
    router_file = Path(router_file)
    if not router_file.is_file():
        raise FileNotFoundError(f"router checkpoint {router_file}: no such file")
    manifest = read_manifest(router_file)
    fingerprint = base_fingerprint(model)
    if manifest.get("base_fingerprint") != fingerprint:
        raise ValueError(
            f"router checkpoint {router_file} was trained on base "
            f"{manifest.get('base_path')} (fingerprint {manifest.get('base_fingerprint')}), "
            f"not on this model (fingerprint {fingerprint})"
        )
    try:
        tensors = load_file(router_file)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"router checkpoint {router_file}: unreadable ({err})") from err
    if manifest.get("lora") and not has_expert_lora(model):  # the adapters it trained
        add_expert_lora(model, ExpertLora(**manifest["lora"]))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    wrong = [
        f"{n}: {tuple(t.shape)} != {tuple(params[n].shape)}"
        for n, t in tensors.items()
        if n in params and t.shape != params[n].shape
    ]
    if unknown or wrong:
        raise ValueError(f"router checkpoint {router_file}: unknown {unknown}, wrong shape {wrong}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            if is_router_param(name):  # fp32 as trained, not rounded to a bf16 base's dtype
                params[name].data = tensor.to(params[name].device)
            else:
                params[name].copy_(tensor)
    trained = RoutingPolicy.from_record(manifest["routing"])
    if routing is not None and routing.describe() != trained.describe():
        warnings.warn(
            f"router checkpoint {router_file} was trained under {trained.describe()} "
            f"but now routes under {routing.describe()}",
            stacklevel=2,
        )
    set_policy(model, routing or trained)
    return manifest
