"""`dmoe-eval`: decode a split under a routing policy; write `metrics.json` and a short table
(`evaluation.run`)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dmoe_train.cli.common import exit_on_error
from dmoe_train.evaluation.run import run_eval
from dmoe_train.locations import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    exit_on_error(run_eval, cfg)


if __name__ == "__main__":
    main()
