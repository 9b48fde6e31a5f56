"""`dmoe-eval`: decode a split under a routing policy; write `metrics.json` and a short table
(`evaluation.run`)."""

from __future__ import annotations

from omegaconf import DictConfig

from dmoe_train.cli.common import exit_on_error, hydra_entry
from dmoe_train.evaluation.run import run_eval


def job(cfg: DictConfig) -> None:
    exit_on_error(run_eval, cfg)


main = hydra_entry("eval", job)


if __name__ == "__main__":
    main()
