"""Tokenizers: the model directory's own, and the character-level one of the tiny base."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dmoe_train.models.checkpoint import require_model_dir

SPECIALS = {"eos": "<|endoftext|>", "mask": "<|mask|>", "unk": "<|unk|>"}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII, one token per character; ids 0/1/2 are eos(=pad)/mask/unk."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS.values())}
    for ch in string.printable[:-5] + "\n":  # drop \t\r\x0b\x0c, keep newline
        vocab.setdefault(ch, len(vocab))
    # BPE with no merges over single characters = a character-level tokenizer
    core = Tokenizer(BPE(vocab=vocab, merges=[], unk_token=SPECIALS["unk"]))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=SPECIALS["eos"],
        pad_token=SPECIALS["eos"],
        mask_token=SPECIALS["mask"],
        unk_token=SPECIALS["unk"],
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a local model directory; never downloads."""
    return AutoTokenizer.from_pretrained(str(require_model_dir(path)), local_files_only=True)
