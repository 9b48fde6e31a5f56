# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv venv-deepspeed test test-slow test-all lint train retrofit compare pareto calibrate breadth pareto-gemma gemma-base ec-study sweep bench bench-cache bench-cache-20

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# the optional DeepSpeed extra (trainer=deepspeed); it builds against the torch above, which an
# isolated build would replace with another
venv-deepspeed: $(VENV)/.deepspeed

$(VENV)/.deepspeed: $(VENV)/.installed
	$(BIN)/pip install -q --no-build-isolation -e ".[deepspeed]"
	touch $@

lint: venv
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

# the fast tier; `make test-all` (what CI runs) adds the slow one: subprocesses, DDP/FSDP,
# torchrun, SIGKILL, sweeps, the bench, the wheel, DeepSpeed
test: lint
	$(BIN)/pytest -m "not slow"

# the ten slowest tests named at the end: CI's whole run must stay under 20 minutes
test-slow: venv-deepspeed
	$(BIN)/pytest -m slow --durations=10

test-all: test test-slow

# the main job on the embedded default (tiny base, synthetic arithmetic); ARGS="..." adds overrides
train: venv
	$(BIN)/dmoe-train $(ARGS)

# retrofit the tiny token-choice base to expert choice (router and routed experts, experiment=retrofit_ec)
retrofit: venv
	$(BIN)/dmoe-train experiment=retrofit_ec hydra.run.dir=outputs/retrofit_ec $(ARGS)

# every routing policy and the router of the newest `make train` run on the same test prompts
# (minutes); the expert-choice retrofit's row joins them once `make retrofit` (27 min) has run
compare: venv
	ls outputs/*/checkpoints/router.safetensors >/dev/null 2>&1 || $(MAKE) train
	$(BIN)/python -m dmoe_train.studies.compare $(ARGS)

# the 256-expert base (LLaDA2.0-mini's routing regime): every training-free method at several
# coreset sizes, the published rules and trained routers on the same 1000 test prompts ->
# results/pareto.{csv,md,png}; finished points are kept under results/pareto/ and not recomputed
pareto: venv
	$(BIN)/python -m dmoe_train.studies.pareto $(ARGS)

# the proxy bases against LLaDA2.0-mini's published training-free figures at the same relative
# budgets (exact match and the final answer) -> results/calibration.{md,csv}; points kept under
# results/calibration/<base>/
calibrate: venv
	$(BIN)/python -m dmoe_train.studies.calibrate $(ARGS)

# routers trained on k of the broad suite's skills, tested on the held-out ones, against k ->
# results/breadth.{md,csv,png}; needs the broad base (make_base --base tiny256-broad)
breadth: venv
	$(BIN)/python -m dmoe_train.studies.breadth $(ARGS)

# block routing on DiffusionGemma (transformers' own MoE dLLM): training-free rules and trained
# routers on the tiny base -> results/pareto_gemma.{csv,md,png}; points kept under
# results/pareto_gemma/
pareto-gemma: venv
	$(BIN)/python -m dmoe_train.studies.pareto_gemma $(ARGS)

# the tiny DiffusionGemma base (assets/tiny-diffusion-gemma), trained here from scratch by its own
# objective on the four skills; resumable (its run in assets/tiny-diffusion-gemma.run)
gemma-base: venv
	$(BIN)/python -m dmoe_train.studies.make_gemma_base $(ARGS)

# expert choice against token choice on the tiny base's task: from-scratch bases (validation loss
# against tokens and seconds, the capacity schedules at matched FLOPs) and retrofits of the tiny
# base by trainable set -> results/ec_vs_tc.{md,png}; finished points kept under results/ec_vs_tc/
ec-study: venv
	$(BIN)/python -m dmoe_train.studies.ec_study $(ARGS)

# Hydra multirun over top_p and the regularizer weight; each run trains, then decodes the test
# split; the summary table and plot land in the sweep directory
SWEEP_DIR ?= multirun/sweep
sweep: venv
	$(BIN)/dmoe-train -m router.top_p=0.3,0.5,0.7,0.9 regularizer=union regularizer.weight=0.01,0.1 \
		evaluate_after=true trainer.enable_progress_bar=false hydra.sweep.dir=$(SWEEP_DIR)
	$(BIN)/python -m dmoe_train.studies.summarize_sweep $(SWEEP_DIR)

# the cost of an expert at LLaDA2.0-mini shapes, measured side by side -> bench/results.{md,json}
bench: venv
	$(BIN)/python -m dmoe_train.studies.bench --out bench

# decoding LLaDA2.0-mini-shaped weights from their files, C experts resident per layer, against all
# loaded (bench/expert_cache.{md,json}); ARGS="--layers 20" for its full depth (~32 GB on disk)
bench-cache: venv
	$(BIN)/python -m dmoe_train.studies.expert_cache_bench --out bench $(ARGS)

# the headline: LLaDA2.0-mini's 20 layers (about 32 GB written to a temporary directory; 33 min here)
bench-cache-20: venv
	$(BIN)/python -m dmoe_train.studies.expert_cache_bench --layers 20 --steps 8 \
		--sizes 16 32 64 256 all --out bench/20-layers $(ARGS)

