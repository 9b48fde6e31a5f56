"""Evaluation: the threshold sampler (`sampler`), decoding a split and its metrics
(`decoding`), `dmoe-eval`'s run (`run`), the lm-eval model, self-generated data and frontiers."""
