"""What the entry points share: the configs' resolvers (`dmoe_train.resolvers`), clean exits on
bad input and the silencing of known noise."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero  # noqa: F401 (sets Lightning's logger below)
from lightning_utilities.core import rank_zero as rank_zero_core
from omegaconf import DictConfig

from dmoe_train.resolvers import ASSETS, CONFIG_DIR, PROJECT_ROOT

__all__ = ["ASSETS", "CONFIG_DIR", "PROJECT_ROOT", "exit_on_error", "exit_on_error_cli"]

log = logging.getLogger("dmoe_train")
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, InstantiationException)


class _DropLightningTips(logging.Filter):
    """Lightning advertises its cloud loggers on every Trainer it builds."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def silence_known_noise() -> None:
    """Messages every run printed that say nothing about it, each matched by its text and
    origin: Lightning's tips and its own use of a deprecated torch pytree API."""
    if any(isinstance(f, _DropLightningTips) for f in rank_zero_core.log.filters):
        return  # once per process: a sweep's jobs and the tests call it again
    rank_zero_core.log.addFilter(_DropLightningTips())
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", module=r"lightning\."
    )


def exit_on_error(run: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Run an entry point: warnings go to the log (Hydra's job log holds the summary, warnings
    and errors), and bad input ends the command with its message and exit code 1, not a
    traceback. In a `-m` sweep the error is logged and raised instead: Hydra records that job
    as failed, runs the others, and ends the sweep with the first failure (exit code 1)."""
    logging.captureWarnings(True)
    silence_known_noise()
    try:
        run(cfg)
    except EXPECTED_ERRORS as err:
        log.error("error: %s", err)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)


def exit_on_error_cli(run: Callable[[], object]) -> None:
    """`exit_on_error` for the argparse commands (`dmoe-export`): one line on stderr, exit 1."""
    silence_known_noise()
    try:
        run()
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
