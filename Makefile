# The verbs of the project. Every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
TRAIN_STAMP := $(VENV)/.installed-train-stamp
ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help install train test test-fast bench bench-real plots lint clean sweep-demo gpu-wheels gpu-check

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# Two installs: `make train` needs only the project and its dependencies (TRAIN_STAMP); every other target also
# the test, lint and export tools of `.[dev]` (STAMP), which cover training too. An environment already holding
# `.[dev]` for this pyproject.toml is not installed into again by `make train`; `make test` after `make train`
# adds what `.[dev]` has more.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e ".[dev]"
	@touch $(STAMP) $(TRAIN_STAMP)

$(TRAIN_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test $(STAMP) -nt pyproject.toml || $(PY) -m pip install --quiet --progress-bar off -e .
	@touch $(TRAIN_STAMP)

install: $(STAMP)  ## create .venv and install the project and its pinned dependencies

train: $(TRAIN_STAMP)  ## train on the embedded dataset and print COCO mAP (ARGS="key=value ..." to override)
	$(PY) scripts/train.py $(ARGS)

sweep-demo: $(STAMP)  ## 2x2 focal-loss sweep (gamma x alpha) on small embedded data (~15 min, 2 cores); prints the table
	@dir=multirun/sweep_demo/$$(date +%Y-%m-%d_%H-%M-%S); \
	$(PY) scripts/train.py -m +sweep=demo hydra.sweep.dir=$$dir '~hydra.callbacks.summarize_sweep' $(ARGS) && \
	$(PY) scripts/summarize_sweep.py $$dir

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## run the tests not marked slow (the end-to-end training runs are)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

plots: $(STAMP)  ## plot the focal loss and its gradient (paper Figure 1) to outputs/plots/ (ARGS="--out x.png")
	$(PY) scripts/plot_focal_loss.py $(ARGS)

bench: $(STAMP)  ## ours vs torchvision side by side: prints the table, writes outputs/bench/bench.json (ARGS="--threads 1")
	$(PY) benchmarks/bench.py $(ARGS)

bench-real: $(STAMP)  ## ours (README own-data command) vs a torchvision script on BCCD, 600 s each on one core (ARGS="--runs 2")
	$(PY) benchmarks/real/run.py $(ARGS)

# Wheels a GPU machine without a package registry lacks (it has torch, torchvision, tensorboard, tqdm, opencv, onnx,
# onnxruntime): the project's other dependencies and their Requires-Dist for Python 3.12, pinned to the versions of
# the project's .venv, plus pytest for scripts/gpu_check.sh. antlr4-python3-runtime 4.9.3 exists only as an sdist
# (pure Python): built into a wheel here. Not needed there: matplotlib (gpu_check turns the run's plots off).
# About 45 MiB, 34 of them scipy (albumentations imports it); where the GPU machine has scipy:
# make gpu-wheels GPU_WHEELS_SKIP=scipy==1.17.1 (about 12 MiB).
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 PyYAML==6.0.4 packaging==26.4 pycocotools==2.0.11 \
	albumentations==2.0.8 albucore==0.0.24 scipy==1.17.1 simsimd==6.5.16 stringzilla==5.3.2 pydantic==2.14.4 \
	pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
	pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0
GPU_SDISTS := antlr4-python3-runtime==4.9.3
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64

gpu-wheels:  ## download into .whl/ the wheels (CPython 3.12, x86_64) a registry-less GPU machine lacks
	@mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(filter-out $(GPU_WHEELS_SKIP),$(GPU_WHEELS))
	$(PYTHON) -m pip wheel -q --no-deps -w .whl $(GPU_SDISTS)
	@ls .whl/*.whl | wc -l | xargs echo "wheels in .whl/:"; du -sh .whl

gpu-check:  ## on a CUDA machine: CUDA tests, 2-min R50 AMP training, GPU bench rows (scripts/gpu_check.sh; exits 0 without CUDA)
	bash scripts/gpu_check.sh

lint: $(STAMP)  ## ruff (rules in pyproject.toml) over the package, scripts, benchmarks and tests
	$(PY) -m ruff check retinanet scripts benchmarks tests

clean:  ## remove caches (keeps .venv, data/ and outputs/)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache
