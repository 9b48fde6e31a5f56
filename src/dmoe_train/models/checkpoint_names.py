"""What a model directory's files are called, and our tensor names against a family's."""

from __future__ import annotations

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def rename(name: str, suffixes: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> str:
    """Replace the first matching name suffix (`(old, new)` pairs)."""
    for old, new in suffixes:
        if name.endswith(old):
            return name.removesuffix(old) + new
    return name
