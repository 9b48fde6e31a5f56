"""Thin launcher: `python -m dmoe_train.studies.estimate_memory`."""

import runpy

runpy.run_module("dmoe_train.studies.estimate_memory", run_name="__main__")
