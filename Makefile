# Two commands set everything up on a fresh machine:
#   make demo   install, then run qopt on the shared stories260K model (SQLite, CPU or GPU)
#   make test   install, then run the test suite (what .ci/run calls)

VENV ?= .venv
PY := $(VENV)/bin/python
QOPT := $(VENV)/bin/qopt
ASSETS ?= ../shared/assets
MODEL ?= $(ASSETS)/models/stories260K/hf
DATA ?= $(ASSETS)/data/tinystories/validation_head.txt
RUNS ?= runs

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed

# torch is pinned first so pip takes the CPU wheel (2.13.0) instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,postgres,dashboard]"
	touch $@

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check qopt tests scripts
	$(VENV)/bin/ruff format --check qopt tests scripts

demo: install
	mkdir -p $(RUNS)
	$(QOPT) strategy preset uniform --bits 4 --group 64 -o $(RUNS)/int4-g64.yaml
	$(QOPT) eval --model $(MODEL) --strategy $(RUNS)/int4-g64.yaml --data $(DATA)

bench: install
	$(PY) scripts/bench_eval.py

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache .ruff_cache .hypothesis
