"""Self-distillation: KL from the starting model under token routing (the teacher) to the
block-routed model being trained, on the masked positions of the batch, or of inputs that belong
to no task at all (uniformly random tokens)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from dmoe_train.settings import refuse

DistillInputs = Literal["batch", "random"]


@dataclass(frozen=True)
class Distillation:
    """`distill_weight` x KL(teacher || student), on `distill_inputs`: `batch`, the training
    forward's own noised input (the teacher adds one forward without gradients), or `random`,
    uniformly random tokens with the batch's shape and response mask (a student forward with
    gradients more). Weight 0: none."""

    distill_weight: float = 0.0
    distill_inputs: DistillInputs = "batch"

    def __post_init__(self) -> None:
        if not self.distill_weight >= 0:
            raise refuse("distill_weight", self.distill_weight, "must be >= 0")
        if self.distill_inputs not in get_args(DistillInputs):
            raise refuse("distill_inputs", repr(self.distill_inputs),
                         f"must be one of {get_args(DistillInputs)}")  # fmt: skip


def masked_kl(
    teacher_logits: Tensor, student_logits: Tensor, masked: Tensor, count: Tensor
) -> Tensor:
    """KL(teacher || student) of the token distributions, summed over masked positions and divided
    by `count` (the masked-token count, as the diffusion loss is normalised)."""
    log_t = teacher_logits[masked].float().log_softmax(-1)
    log_s = student_logits[masked].float().log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum() / count.clamp_min(1)


def random_tokens(keys: list[int], n: int, vocab: int, mask_id: int) -> Tensor:
    """`[B, n]` tokens drawn uniformly from the vocabulary less the mask token, row i from a
    generator seeded by `keys[i]` (as `row_uniforms`): inputs that belong to no task."""
    rows = [
        torch.randint(vocab - 1, (n,), generator=torch.Generator().manual_seed(k)) for k in keys
    ]
    tokens = torch.stack(rows)
    return tokens + (tokens >= mask_id).long()  # skip the mask token


def distillation_kl(
    settings: Distillation,
    student: Callable[[Tensor], Any],
    teacher: Callable[[Tensor], Any],
    trained: tuple[Tensor, Any],
    keys: list[int],
    mask_id: int,
    count: Callable[[Tensor], Tensor],
) -> Tensor:
    """The KL term of one step (0 without distillation). `student(x0)` / `teacher(x0)`: the
    trained and the starting model's noised forwards of clean tokens `x0` under the same noise,
    each giving `.logits` and `.masked`; `trained`: the step's own input and its student
    forward, reused under `batch` inputs; `keys`: the samples' noise keys (random inputs are
    keyed apart from them); `count`: the masked-token count a loss is normalised by."""
    x0, out = trained
    if not settings.distill_weight:
        return out.logits.new_zeros(())
    if settings.distill_inputs == "random":
        keys = [hash((k, -1)) % 2**63 for k in keys]  # tuples of ints hash alike everywhere
        x0 = random_tokens(keys, x0.shape[1], out.logits.shape[-1], mask_id).to(x0.device)
        out = student(x0)
    with torch.no_grad():
        reference = teacher(x0)
    return masked_kl(reference.logits, out.logits, out.masked, count(out.masked))
