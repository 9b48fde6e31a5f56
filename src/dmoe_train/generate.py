"""Block-diffusion decoding as LLaDA2 decodes.

The prompt is followed by `gen_length` mask tokens. Blocks of `block_length` are counted from
each sample's first real token, as in training, so the block holding the end of the prompt is the
first one decoded (its prompt tokens stay as they are). Each block is decoded in at most `steps`
forwards: every forward predicts the block's masked positions and commits the most confident ones
(low-confidence remasking), evenly spread over the steps, or, with `threshold`, every position
above it (at least one per step). Attention is block-causal: a position sees its own block and
earlier ones. Temperature 0: predictions are the argmax. Prompts are left-padded; padding is
never attended and never votes in routing.
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


def commit_mask(
    confidence: Tensor, masked: Tensor, steps_left: int, threshold: float | None
) -> Tensor:
    """Which masked positions `[B, L]` to commit this step.

    Low-confidence remasking commits the ceil(masked / steps_left) most confident positions of
    each sample; with `threshold`, every position above it, and at least the most confident one.
    """
    confidence = confidence.masked_fill(~masked, -1.0)
    rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
    if threshold is None:
        quota = -(-masked.sum(1, keepdim=True) // steps_left)
        return masked & (rank < quota)
    return masked & ((confidence > threshold) | (rank == 0))


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
    block = positions // block_length
    attention = as_additive((block[:, None, :] <= block[:, :, None]) & valid[:, None, :])
    generated = torch.zeros_like(valid)
    generated[:, p:] = True
    for current in range(int(block[:, p].min()), int(block[:, -1].max()) + 1):
        in_block = generated & (block == current)
        for step in range(steps):
            masked = in_block & (x == mask_id)
            if not masked.any():
                break
            logits = model(x, attention_mask=attention, position_ids=positions, valid=valid).logits
            confidence, tokens = logits.float().softmax(-1).max(-1)
            chosen = commit_mask(confidence, masked, steps - step, threshold)
            x = torch.where(chosen, tokens, x)
        done = generated & (block <= current) & (x == eos_id)
        if done.any(1).all():
            break
    out = x[:, p:]
    after_eos = (out == eos_id).long().cumsum(1) > 0
    return out.masked_fill(after_eos, eos_id)
