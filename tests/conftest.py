"""Shared fixtures: the skip of `gpu` tests without CUDA, a tiny config, a tokenizer directory, and
the guard that a bad setting is refused before the model loads."""

import json

import pytest
import torch
from helpers import TINY


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, saying so, on a machine without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with pytest -m gpu where a GPU is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_cfg() -> dict:
    return dict(TINY)


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A model directory holding only what data needs: the tokenizer and a config.json."""
    from dmoe_train.data.tokenizer import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "llada2_moe"}))
    return tmp_path / "tok"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is built: the error must come before it."""

    def loaded(*_, **__):
        raise AssertionError("the model was loaded before the bad setting was refused")

    monkeypatch.setattr("dmoe_train.cli.train.load_routed_model", loaded)
