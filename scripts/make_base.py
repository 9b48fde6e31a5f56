"""Thin launcher: `python -m dmoe_train.studies.make_base`."""

import runpy

runpy.run_module("dmoe_train.studies.make_base", run_name="__main__")
