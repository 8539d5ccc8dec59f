# Two commands set up everything on a fresh machine:
#   make test                      # venv + install + the fast tests (~4 min on 2 cores)
#   make test-all                  # + the slow end-to-end tests: dvc on a tiny synthetic pipeline,
#                                  #   headless Chromium, the registry (~14 min; what CI runs)
#   make repro SOURCE=path/or/url  # venv + install + dvc repro: the default pipeline (SOURCE is optional)
#   make repro-screened            # + the screened variants, k-fold ensemble, report over every model
# `make lint` runs ruff (lint + formatting check; settings in pyproject.toml), as .ci/run does.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SOURCE ?=
# ImageNet weights are looked up in Keras's cache; point it at the offline copy when there is one.
KERAS_HOME ?= $(if $(wildcard ../shared/keras/models),$(abspath ../shared/keras),$(HOME)/.keras)
export KERAS_HOME
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONHASHSEED ?= 0

.PHONY: test test-all test-slow lint repro repro-screened install bench clean-venv

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The default pipeline (dvc.yaml: the seed's six variants and the headline model, ~23 min on 2 cores);
# repro-screened adds screened/dvc.yaml (the screened variants, the k-fold ensemble and the report
# over every model, ~90 min more), running what it needs of the default one first.
# SOURCE=... goes through `dvc exp run -S fetch.source=...`: params.yaml gets the new source,
# dvc.lock records it, and the run is kept as a DVC experiment you can compare or drop.
DVC_RUN = PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc $(if $(strip $(SOURCE)),exp run -S 'fetch.source="$(SOURCE)"',repro)

repro: $(STAMP)
	$(DVC_RUN) $(DVC_ARGS)

repro-screened: $(STAMP)
	$(DVC_RUN) screened/dvc.yaml $(DVC_ARGS)

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/run.py $(BENCH_ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
