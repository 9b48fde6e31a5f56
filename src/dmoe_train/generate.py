"""Block-diffusion decoding as LLaDA2 decodes.

The prompt (left-padded to a common length) is followed by `gen_length` mask tokens in blocks of
`block_length`. Blocks are decoded left to right, each in `steps` forwards: every forward
predicts all masked positions of the current block and commits the most confident ones
(low-confidence remasking), `block_length / steps` per step, or, with `threshold`, every position
above it (at least one). Attention is block-causal: a position sees its own block and earlier
ones, never later ones. Temperature 0: predictions are the argmax.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmoe_train.diffusion import as_additive


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        valid[i, width - len(p) :] = True
    return ids, valid


def commit_schedule(n_masked: int, steps: int) -> list[int]:
    """How many positions each step commits: as even as possible, summing to `n_masked`."""
    base, extra = divmod(n_masked, steps)
    return [base + (i < extra) for i in range(steps)]


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
    eos_id: int,
    threshold: float | None = None,
) -> Tensor:
    """Generated token ids `[B, gen_length]` (positions after an eos are eos)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_valid = left_pad(prompts, eos_id)
    b, p = prompt_ids.shape
    x = torch.cat([prompt_ids, torch.full((b, gen_length), mask_id)], dim=1).to(device)
    valid = torch.cat([prompt_valid, torch.ones(b, gen_length, dtype=torch.bool)], 1).to(device)
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    block = torch.cat(
        [torch.zeros(p, dtype=torch.long), 1 + torch.arange(gen_length) // block_length]
    ).to(device)
    causal = block[:, None] >= block[None, :]
    for start in range(p, p + gen_length, block_length):
        end = min(start + block_length, p + gen_length)
        attend = causal[:end, :end][None] & valid[:, None, :end]
        mask = as_additive(attend)
        for n_commit in commit_schedule(end - start, steps):
            masked = x[:, start:end] == mask_id
            if not masked.any():
                break
            out = model(
                x[:, :end],
                attention_mask=mask,
                position_ids=positions[:, :end],
                valid=valid[:, :end],
            )
            probs = out.logits[:, start:end].float().softmax(-1)
            confidence, tokens = probs.max(-1)
            confidence = confidence.masked_fill(~masked, -1.0)
            if threshold is None:
                take = max(n_commit, 1)
                chosen = torch.zeros_like(masked).scatter(
                    1, confidence.topk(take, dim=1).indices, True
                )
            else:
                best = torch.zeros_like(masked).scatter(1, confidence.argmax(1, keepdim=True), True)
                chosen = (confidence > threshold) | best
            chosen &= masked
            x[:, start:end] = torch.where(chosen, tokens, x[:, start:end])
        if ((x[:, p:end] == eos_id).any(1)).all():
            x[:, end:] = eos_id
            break
    out = x[:, p:]
    after_eos = (out == eos_id).long().cumsum(1) > 0
    return out.masked_fill(after_eos, eos_id)
