"""Quality measures of a model on a DataModule's splits."""

from __future__ import annotations

import torch

from dmoe_train.data.module import DiffusionDataModule
from dmoe_train.diffusion import denoise
from dmoe_train.generate import generate


def content_positions(x0: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Response positions up to and including the first eos: the answer, not its padding."""
    eos = (x0 == eos_id) & response_mask
    return response_mask & (eos.long().cumsum(1) - eos.long() == 0)


@torch.no_grad()
def masked_token_accuracy(
    model: torch.nn.Module, data: DiffusionDataModule, block_size: int, seed: int = 0
) -> float:
    """Argmax accuracy on masked answer tokens of the validation split, t ~ U[0.3, 0.8]."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    correct = total = 0
    for batch in data.val_dataloader():
        x0 = batch["input_ids"]
        out = denoise(
            model,
            x0,
            batch["response_mask"],
            cfg.mask_token_id,
            0.3,
            0.8,
            "block_diffusion",
            block_size,
            gen,
        )
        scored = out.masked & content_positions(x0, batch["response_mask"], cfg.eos_token_id)
        correct += int((out.logits.argmax(-1) == x0)[scored].sum())
        total += int(scored.sum())
    return correct / max(total, 1)


@torch.no_grad()
def exact_match_accuracy(
    model: torch.nn.Module, data: DiffusionDataModule, block_size: int, split: str = "test"
) -> float:
    """Generated answers equal to the reference (arithmetic: the exact result string)."""
    cfg = model.config
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    correct = total = 0
    for batch in loader:
        prompts = [
            ids[:n].tolist() for ids, n in zip(batch["input_ids"], batch["prompt_len"], strict=True)
        ]
        gen_length = data.max_seq_len - max(len(p) for p in prompts)
        tokens = generate(
            model, prompts, gen_length, block_size, block_size, cfg.mask_token_id, cfg.eos_token_id
        )
        texts = data.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        correct += sum(t.strip() == a.strip() for t, a in zip(texts, batch["answer"], strict=True))
        total += len(texts)
    return correct / max(total, 1)
