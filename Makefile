# Two commands set everything up on a fresh machine:
#   make demo   install, then run a 450-trial study on the shared stories260K model (SQLite)
#   make test   install (with the llamacpp and compressed-tensors extras), then run the tests (.ci/run)

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

# The serving extras the tests check exports against: llama-cpp-python (`llamacpp`) builds
# llama.cpp from source on first install, several minutes on 2 cores, then pip's wheel cache
# makes it seconds; compressed-tensors is a plain wheel.
LLAMACPP_CMAKE ?= -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF

$(VENV)/.engines: $(VENV)/.installed pyproject.toml
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q -e ".[llamacpp,compressed-tensors]"
	touch $@

test: install $(VENV)/.engines
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check qopt tests scripts
	$(VENV)/bin/ruff format --check qopt tests scripts

STUDY ?= stories260k
TRIALS ?= 450

# The main job: an NSGA-II study of the full genome on stories260K at <= 4.25 bpw, seeded with
# the human schemes and the allocator, refining at 3.25 and 4.25 bpw; stored in runs/qopt.db;
# running it again adds TRIALS more trials to the same study.
demo: install
	$(QOPT) study create $(STUDY) --config studies/stories260k.yaml
	$(QOPT) study launch $(STUDY) --n-trials $(TRIALS)
	$(QOPT) study front $(STUDY)
	$(QOPT) export $(STUDY) --max-bpw 3.25 -o $(RUNS)/$(STUDY)-best --force
	$(QOPT) study best $(STUDY) --max-bpw 4.25 -o $(RUNS)/$(STUDY)-best-4.25.yaml
	$(QOPT) study report $(STUDY) -o $(RUNS)/$(STUDY)-report.html

bench: install
	$(PY) scripts/bench_eval.py

clean:
	rm -rf $(VENV) $(RUNS) .pytest_cache .ruff_cache .hypothesis
