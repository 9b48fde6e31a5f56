"""What the entry points share: the configs' resolvers (`dmoe_train.resolvers`), clean exits on
bad input (one line, exit code 1) and the silencing of known noise."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero  # noqa: F401 (sets Lightning's logger below)
from lightning_utilities.core import rank_zero as rank_zero_core
from omegaconf import DictConfig, OmegaConf

from dmoe_train.resolvers import ASSETS, CONFIG_DIR, PROJECT_ROOT

__all__ = [
    "ASSETS",
    "CONFIG_DIR",
    "PROJECT_ROOT",
    "exit_on_error",
    "exit_on_error_cli",
    "hydra_entry",
]

log = logging.getLogger("dmoe_train")
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, InstantiationException)


def message_of(err: BaseException) -> str:
    """What a user reads of a refusal: one line. A setting refused while Hydra instantiated its
    group is Hydra's three-line wrapper around our own message: the message alone."""
    while isinstance(err, InstantiationException) and isinstance(err.__cause__, EXPECTED_ERRORS):
        err = err.__cause__
    return " ".join(str(err).split())


def composition_message(err: HydraException) -> str:
    """Hydra's refusal of an override, in one line; an override of a key the selected preset of
    its group lacks names the presets that have it."""
    found = re.match(r"Could not override '(\w+)\.([\w.]+)'", str(err))
    if found is None:
        return " ".join(str(err).split())
    group, key = found.groups()
    absent = object()
    presets = [
        path.stem
        for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
        if OmegaConf.select(OmegaConf.load(path), key, default=absent) is not absent
    ]
    where = f"{group}.{key}: not a setting of the {group} preset in use"
    if not presets:
        return f"{where}, nor of any {group} preset"
    having = " and ".join(f"{group}={p}" for p in presets)
    return f"{where}; {having} has it (add that to the command)"


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
        log.error("error: %s", message_of(err))
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)


def hydra_entry(config_name: str, job: Callable[[DictConfig], None]) -> Callable[[], None]:
    """The `main` of a Hydra command: `job` (which calls `exit_on_error`) on the composed config
    `config_name`. What Hydra refuses before the job runs (an override of a key the preset in
    use lacks, an unknown preset) and a failed sweep point end as one line and exit code 1 too:
    Hydra is told to raise them instead of printing its own report."""
    composed = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=config_name)
    run = composed(job)

    def main() -> None:
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            run()
        except EXPECTED_ERRORS as err:  # a failed sweep point's, raised again at the end
            print(f"error: {message_of(err)}", file=sys.stderr)
            sys.exit(1)
        except HydraException as err:
            print(f"error: {composition_message(err)}", file=sys.stderr)
            sys.exit(1)

    return main


def exit_on_error_cli(run: Callable[[], object]) -> None:
    """`exit_on_error` for the argparse commands (`dmoe-export`): one line on stderr, exit 1."""
    silence_known_noise()
    try:
        run()
    except EXPECTED_ERRORS as err:
        print(f"error: {message_of(err)}", file=sys.stderr)
        sys.exit(1)
