"""The studies and benchmarks, each run with `python -m dmoe_train.studies.<name>` (the Makefile's
targets): `pareto`, `ec_study`, `compare`, `bench`, `bench_full_width`, the base recipe
`make_base`, `estimate_memory`, `full_width_checkpoint`, `summarize_sweep`; `points` keeps each
study's points resumable. The top layer beside `cli`: nothing in the package imports it."""
