# Two commands set everything up on a fresh machine:
#   make demo   install, then run a 1000-trial study on the shared stories260K model (SQLite)
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

STUDY ?= stories260k
TRIALS ?= 1000

# The main job: an NSGA-II study of the full genome on stories260K at <= 3.25 bpw,
# stored in runs/qopt.db; running it again adds TRIALS more trials to the same study.
demo: install
	$(QOPT) study create $(STUDY) --config studies/stories260k.yaml
	$(QOPT) study launch $(STUDY) --n-trials $(TRIALS)
	$(QOPT) study front $(STUDY)
	$(QOPT) export $(STUDY) --max-bpw 3.25 -o $(RUNS)/$(STUDY)-best --force
	$(QOPT) study report $(STUDY) -o $(RUNS)/$(STUDY)-report.html

bench: install
	$(PY) scripts/bench_eval.py

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache .ruff_cache .hypothesis
