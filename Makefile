# The verbs of the project. Every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help install train test test-fast bench bench-real plots lint clean sweep-demo

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project and its pinned dependencies

train: $(STAMP)  ## train on the embedded dataset and print COCO mAP (ARGS="key=value ..." to override)
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

lint: $(STAMP)  ## ruff (rules in pyproject.toml) over the package, scripts, benchmarks and tests
	$(PY) -m ruff check retinanet scripts benchmarks tests

clean:  ## remove caches (keeps .venv, data/ and outputs/)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache
