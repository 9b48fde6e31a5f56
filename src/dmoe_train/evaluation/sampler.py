"""Block-diffusion decoding as LLaDA2 decodes.

Each prompt is followed by `gen_length` mask tokens. Blocks of `block_length` are counted from a
sample's first real token, as in training; prompts are left-padded by whole blocks, so decoding
blocks, routing blocks and index blocks coincide for every sample of a batch. The block holding
the end of a prompt is the first one decoded (its prompt tokens stay). Each block takes at most
`steps` forwards: a forward predicts the block's masked positions and commits the most confident
ones (low-confidence remasking), spread evenly over the steps, or, with `threshold`, every one
above it (at least one per step). Attention is block-causal: a position sees its own block and
earlier ones, so a finished block's keys and values never change and `cache=True` keeps them
(after one forward of the finished block with its final tokens): the tokens are those of
`cache=False`. Temperature 0: the argmax is committed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from dmoe_train.models.block_diffusion import as_additive
from dmoe_train.models.expert_cache import resident_caches
from dmoe_train.models.lm import LMOutput
from dmoe_train.objectives.expert_metrics import expert_load, unique_experts_per_block


@dataclass
class BlockDecode:
    tokens: Tensor  # [B, gen_length]; positions after an eos are eos
    unique_experts: Tensor  # [forwards, B, moe_layers]: distinct experts of the decoded block
    unique_experts_masked: Tensor  # the same, counting only its still-masked positions
    counted: Tensor  # [forwards, B]: the sample's own forwards (masks left in the block, no eos
    # before it); a batch decodes on for its slowest sample, and those forwards do not count
    expert_load: Tensor  # [moe_layers, E]: tokens each expert processed, over all forwards
    tokens_routed: int  # decoded-block positions routed per MoE layer, over counted forwards
    seconds: float
    blocks: int  # blocks decoded (a batch's, each of its denoising forwards counted once)

    def per_sample(self, unique: Tensor) -> Tensor:
        """`unique` `[forwards, B, layers]` -> its mean over each sample's counted forwards."""
        weight = self.counted[..., None].float()
        return (unique * weight).sum(0) / weight.sum(0).clamp_min(1)


@dataclass
class Layout:
    x: Tensor  # [B, W] prompt, masks to generate, padding
    valid: Tensor  # [B, W] real (prompt or generated) positions
    generated: Tensor  # [B, W] positions to generate
    positions: Tensor  # [B, W] position ids, 0 at each sample's first token
    attention: Tensor  # [B, 1, W, W] additive block-causal mask


def block_layout(
    prompts: list[list[int]], gen_length: int, block_length: int, pad_id: int, mask_id: int
) -> Layout:
    """Left-pad every prompt by whole blocks (to the longest prompt's block count)."""
    prompt_blocks = [-(-len(p) // block_length) for p in prompts]
    starts = [block_length * (max(prompt_blocks) - n) for n in prompt_blocks]
    width = max(s + len(p) for s, p in zip(starts, prompts, strict=True)) + gen_length
    b = len(prompts)
    x = torch.full((b, width), pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    generated = torch.zeros_like(valid)
    positions = torch.zeros(b, width, dtype=torch.long)
    for i, (start, prompt) in enumerate(zip(starts, prompts, strict=True)):
        end = start + len(prompt)
        x[i, start:end] = torch.tensor(prompt, dtype=torch.long)
        x[i, end : end + gen_length] = mask_id
        valid[i, start : end + gen_length] = True
        generated[i, end : end + gen_length] = True
        positions[i, start:] = torch.arange(width - start)
    block = torch.arange(width) // block_length
    allowed = (block[None, :, None] >= block[None, None, :]) & valid[:, None, :]
    # a padding position attends itself: no all-masked row, so no NaN that could leak
    allowed |= torch.eye(width, dtype=torch.bool)
    return Layout(x, valid, generated, positions, as_additive(allowed))


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


class _Decoder:
    """One `generate` call's state: the layout on the model's device, the prefix cache (the
    keys and values of finished blocks) and the routing statistics of the decoded blocks."""

    def __init__(
        self, model: torch.nn.Module, lay: Layout, mask_id: int, eos_id: int, cache: bool
    ) -> None:
        device = next(model.parameters()).device
        self.model, self.mask_id, self.eos_id, self.cache = model, mask_id, eos_id, cache
        self.x, self.valid, self.gen, self.pos, self.attn = (
            t.to(device) for t in (lay.x, lay.valid, lay.generated, lay.positions, lay.attention)
        )
        self.past: list | None = None
        self.unique: list[Tensor] = []
        self.unique_masked: list[Tensor] = []
        self.counted: list[Tensor] = []
        self.load = torch.zeros((), dtype=torch.long, device=device)
        self.routed = 0

    def forward(self, lo: int, hi: int) -> tuple[LMOutput, int]:
        """The model on positions lo..hi (on 0..hi without a cache); the offset of lo."""
        start = lo if self.cache else 0
        out = self.model(
            self.x[:, start:hi],
            attention_mask=self.attn[:, :, start:hi, :hi],
            position_ids=self.pos[:, start:hi],
            valid=self.valid[:, start:hi],
            past_key_values=self.past if self.cache else None,
        )
        return out, lo - start

    def masked(self, lo: int, hi: int) -> Tensor:
        return self.gen[:, lo:hi] & (self.x[:, lo:hi] == self.mask_id)

    def step(self, lo: int, hi: int, steps_left: int, threshold: float | None) -> None:
        """One denoising forward of block lo..hi: record its routing, commit tokens."""
        masked = self.masked(lo, hi)
        finished = ((self.x[:, :lo] == self.eos_id) & self.gen[:, :lo]).any(1)
        counted = masked.any(1) & ~finished
        out, offset = self.forward(lo, hi)
        valid = self.valid[:, lo:hi]
        block_ids = [r.ids[:, offset : offset + hi - lo] for r in out.routing]
        self.unique.append(_count(block_ids, valid))
        self.unique_masked.append(_count(block_ids, masked))
        self.counted.append(counted)
        experts = [r.scores.shape[-1] for r in out.routing]
        routed = valid & counted[:, None]
        self.load = self.load + torch.stack(
            [expert_load(ids, e, routed) for ids, e in zip(block_ids, experts, strict=True)]
        )
        self.routed += int(routed.sum())
        probs = out.logits[:, offset : offset + hi - lo].float().softmax(-1)
        confidence, tokens = probs.max(-1)
        chosen = commit_mask(confidence, masked, steps_left, threshold)
        self.x[:, lo:hi] = torch.where(chosen, tokens, self.x[:, lo:hi])

    def keep(self, lo: int, hi: int) -> None:
        """Cache the finished block's exact keys and values, computed with its final tokens."""
        new = self.forward(lo, hi)[0].key_values
        if self.past is None:
            self.past = new
        else:
            self.past = [
                (torch.cat([pk, k], 2), torch.cat([pv, v], 2))
                for (pk, pv), (k, v) in zip(self.past, new, strict=True)
            ]


@torch.no_grad()
def decode_blocks(
    model: torch.nn.Module,
    prompts: list[list[int]],
    gen_length: int,
    block_length: int,
    steps: int,
    mask_id: int,
    eos_id: int,
    threshold: float | None = None,
    cache: bool = False,
) -> BlockDecode:
    lay = block_layout(prompts, gen_length, block_length, eos_id, mask_id)
    dec = _Decoder(model, lay, mask_id, eos_id, cache)
    width = lay.x.shape[1]
    first = int(lay.generated.float().argmax(1).min()) // block_length
    if cache and first > 0:  # prefill the prompt's full blocks
        dec.past = dec.forward(0, first * block_length)[0].key_values
    began = time.perf_counter()
    caches = resident_caches(model)
    blocks = 0
    for lo in range(first * block_length, width, block_length):
        hi = min(lo + block_length, width)
        blocks += 1
        for c in caches:
            c.begin_block(lo // block_length)
        for step in range(steps):
            if not dec.masked(lo, hi).any():
                break
            dec.step(lo, hi, steps - step, threshold)
        if ((dec.x[:, :hi] == eos_id) & dec.gen[:, :hi]).any(1).all():
            break
        if cache:
            dec.keep(lo, hi)
    seconds = time.perf_counter() - began
    tokens = dec.x[dec.gen].view(len(prompts), gen_length).clone()
    tokens[tokens == mask_id] = eos_id  # an early stop leaves later blocks undecoded
    tokens = tokens.masked_fill((tokens == eos_id).long().cumsum(1) > 0, eos_id)
    return BlockDecode(
        tokens,
        torch.stack(dec.unique),
        torch.stack(dec.unique_masked),
        torch.stack(dec.counted),
        dec.load.cpu(),
        dec.routed,
        seconds,
        blocks,
    )


def _count(block_ids: list[Tensor], counted: Tensor) -> Tensor:
    """Distinct experts per sample and MoE layer `[B, layers]` among the `counted` positions."""
    size = counted.shape[1]
    return torch.stack(
        [unique_experts_per_block(ids, size, counted)[:, 0] for ids in block_ids], dim=1
    ).float()
