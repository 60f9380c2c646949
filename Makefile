# The verbs of the project. Every target creates the virtual environment first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help install train test test-fast bench plots lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project and its pinned dependencies

train: $(STAMP)  ## train on the embedded dataset and print COCO mAP (ARGS="key=value ..." to override)
	$(PY) scripts/train.py $(ARGS)

test: $(STAMP)  ## run the whole test suite
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## run the tests not marked slow
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)  ## byte-compile everything (syntax check)
	$(PY) -m compileall -q retinanet scripts tests

clean:  ## remove caches (keeps .venv, data/ and outputs/)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf .pytest_cache
