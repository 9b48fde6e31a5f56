"""Tokenizers: the model directory's own, and the character-level one of the tiny base."""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import (
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from dmoe_train.models.model_dir import require_model_dir

# what a saved tokenizer consists of (one of these is enough for AutoTokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
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
    path = require_model_dir(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"model path {path}: no tokenizer (none of {TOKENIZER_FILES})")
    # our families are unknown to transformers: an empty config (the tokenizer files name their
    # class) keeps AutoTokenizer from reading config.json and warning about its model_type
    config = PretrainedConfig()
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, config=config)
