"""Thin launcher: `python -m dmoe_train.studies.full_width_checkpoint`."""

import runpy

runpy.run_module("dmoe_train.studies.full_width_checkpoint", run_name="__main__")
