"""`dmoe-lm-eval`: lm-eval's CLI with the `dmoe` model registered (importing
`evaluation.lm_eval_model` registers it), then its routing report."""

from __future__ import annotations

import json
import os
import sys

import torch
from lm_eval.__main__ import cli_evaluate

from dmoe_train.evaluation.lm_eval_model import DiffusionLM, format_report


def main() -> None:
    """`dmoe-lm-eval`: lm-eval's CLI with the `dmoe` model registered; then the routing report
    (also written beside lm-eval's results under `--output_path`)."""
    cli_evaluate()
    lm = DiffusionLM.latest
    if lm is None:
        return
    report = lm.routing_report()
    if lm.rank == 0:
        print(format_report(report))
        if "--output_path" in sys.argv:
            out = sys.argv[sys.argv.index("--output_path") + 1]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "dmoe_routing.json"), "w") as f:
                json.dump(report, f, indent=2)
    if torch.distributed.is_initialized():  # gloo's threads must not outlive the group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
