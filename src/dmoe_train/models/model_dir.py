"""Model directories: `config.json` + safetensors (one file or shards with an index).

Routed experts live stacked in memory (`...mlp.experts.gate_proj` `[E, I, H]`, the merged
layout); the published split layout (`...mlp.experts.7.gate_proj.weight`) is what we write, and
both are read. Loading builds the model on the meta device and assigns each tensor as it is read
(already on `device`, in `dtype`), so no second full copy of the weights is made.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from dmoe_train.files import save_safetensors
from dmoe_train.models.checkpoint_names import INDEX, SINGLE, rename
from dmoe_train.models.expert_cache import offload_experts
from dmoe_train.models.lora import base_name, is_lora_param
from dmoe_train.routing import ENGINE_KEYS, engine_config

SPLIT_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointMismatchError(ValueError):
    """The tensors of a checkpoint do not match the model its config describes."""


def require_model_dir(path: str | Path) -> Path:
    """A local model directory, or a clear error (never a hub lookup)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model path {path}: no config.json (not a model directory)")
    return path


def checkpoint_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    raise FileNotFoundError(f"model path {path}: no {INDEX} or {SINGLE}")


def iter_tensors(
    path: Path, device: str, keep: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors; those `keep` refuses are never read."""
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if keep(name):
                    yield name, f.get_tensor(name)


def is_routed_expert(name: str) -> bool:
    """A routed expert's weight, in the split or the merged layout."""
    return bool(SPLIT_EXPERT.match(name)) or name.endswith(
        tuple(f".mlp.experts.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    )


def _expected_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The checkpoint's names and shapes: the model's, without a tied head, expert adapters or
    the `base_layer` of peft's wrappers (a sharded load of a model that carries adapters)."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    return {
        base_name(k): v.shape
        for k, v in model.state_dict().items()
        if k not in tied and not is_lora_param(k)
    }


def read_state_dict(
    model: nn.Module,
    path: Path,
    dtype: torch.dtype | None,
    device: str,
    place: Callable[[str, Tensor], Tensor] = lambda name, tensor: tensor,
    skip_experts: bool = False,
) -> dict[str, Tensor]:
    """Read every tensor of `path` into the model's (merged) names, checking names and shapes;
    each whole tensor goes through `place` (a sharded load keeps only its piece).
    `skip_experts`: the routed experts are neither read nor expected (an expert store reads
    them later, one at a time)."""
    expected = _expected_shapes(model)
    if skip_experts:
        expected = {k: v for k, v in expected.items() if not is_routed_expert(k)}
    state: dict[str, Tensor] = {}
    split_parts: dict[str, dict[int, Tensor]] = defaultdict(dict)
    unexpected, bad_shapes = [], []
    published = getattr(model, "published_names", ())
    keep = (lambda name: not is_routed_expert(name)) if skip_experts else (lambda name: True)
    for name, tensor in iter_tensors(path, device, keep):
        name = rename(name, [(b, a) for a, b in published])
        split = SPLIT_EXPERT.match(name)
        key = f"{split[1]}.{split[3]}" if split else name
        if key not in expected or (split and int(split[2]) >= expected[key][0]):
            unexpected.append(name)
            continue
        want = expected[key][1:] if split else expected[key]
        if tensor.shape != want:
            bad_shapes.append(f"{name}: {tuple(tensor.shape)} != expected {tuple(want)}")
            continue
        tensor = tensor if dtype is None else tensor.to(dtype)
        if not split:
            state[key] = place(key, tensor)
            continue
        parts = split_parts[key]
        parts[int(split[2])] = tensor
        if len(parts) == expected[key][0]:  # all experts read: stack, free the parts
            state[key] = place(key, torch.stack([parts[e] for e in range(len(parts))]))
            del split_parts[key]
    missing = [k for k in expected if k not in state and k not in split_parts]
    for key, parts in split_parts.items():
        prefix, proj = key.rsplit(".", 1)
        missing += [
            f"{prefix}.{e}.{proj}.weight" for e in range(expected[key][0]) if e not in parts
        ]
    if missing or unexpected or bad_shapes:
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match its config: "
            + "; ".join(
                f"{what} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                for what, names in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("wrong shape", bad_shapes),
                )
                if names
            )
        )
    return state


def load_pretrained(
    model_cls: Any,
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    routing: Any = None,
    expert_cache: int | None = None,
) -> Any:
    """`device="meta"`: the model without its weights, for a sharded load (`load_shards`).
    `expert_cache`: the routed experts are never loaded whole; they stay in the files, and each
    MoE layer keeps that many resident (`expert_cache.offload_experts`, the disk store)."""
    path = require_model_dir(path)
    config = model_cls.config_class.from_json(path / "config.json")
    with torch.device("meta"):
        model = model_cls(config)
    model.name_or_path = str(path)
    if routing is not None:
        model.set_routing(routing)
    if str(device) == "meta":
        return (model if dtype is None else model.to(dtype)).eval()
    skip = expert_cache is not None
    state = read_state_dict(model, path, dtype, str(device or "cpu"), skip_experts=skip)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    if skip:
        offload_experts(model, expert_cache, "disk", path)
    return model.eval()


def split_layout(
    state: dict[str, Tensor], published: tuple[tuple[str, str], ...] = ()
) -> Iterator[tuple[str, Tensor]]:
    """The published names: stacked experts become one tensor per expert, and a family's
    `published` suffixes replace ours."""
    for name, tensor in state.items():
        name = rename(name, published)
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith(".mlp.experts") and proj in ("gate_proj", "up_proj", "down_proj"):
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{e}.{proj}.weight", tensor[e]
        else:
            yield name, tensor


def save_pretrained(model: nn.Module, path: str | Path, max_shard_bytes: int) -> None:
    """Write `config.json` and the published split layout, sharded at `max_shard_bytes`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in split_layout(state, model.published_names):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = (
        [SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file, shard in zip(names, shards, strict=True):
        # clone: safetensors refuses views that share storage (the slices of one expert stack)
        save_safetensors(
            {k: v.detach().to("cpu").clone() for k, v in shard.items()},
            path / file,
            metadata={"format": "pt"},
        )
    if len(shards) > 1:
        weight_map = {k: f for f, shard in zip(names, shards, strict=True) for k in shard}
        index = {"metadata": {"total_size": sum(_nbytes(s) for s in shards)}}
        (path / INDEX).write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    else:
        (path / INDEX).unlink(missing_ok=True)
    # the engine keys follow the routing written beside them, never a loaded config's old ones
    config = {k: v for k, v in model.config.to_dict().items() if k not in ENGINE_KEYS}
    config |= engine_config(model.config.routing)
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _nbytes(tensors: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
