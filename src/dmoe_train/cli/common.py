"""What the Hydra entry points (and scripts composing their configs) share: where the configs
are, the `${project_root:}` and `${run_id:}` resolvers, and clean exits on bad input."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from dmoe_train.run_dirs import run_id

# shipped inside the package, so an installed wheel finds them too
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_CHECKOUT = Path(__file__).resolve().parents[3]
# the repository (its assets/, outputs/) when running from a checkout, else the working directory
PROJECT_ROOT = _CHECKOUT if (_CHECKOUT / "pyproject.toml").is_file() else Path.cwd()

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", run_id, replace=True)

log = logging.getLogger("dmoe_train")
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, InstantiationException)


def exit_on_error(run: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Run an entry point: warnings go to the log (Hydra's job log holds the summary, warnings
    and errors), and bad input ends the command with its message and exit code 1, not a
    traceback."""
    logging.captureWarnings(True)
    try:
        run(cfg)
    except EXPECTED_ERRORS as err:
        log.error("error: %s", err)
        sys.exit(1)
