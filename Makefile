# `make demo` and `make test` do all of their own set-up on a fresh machine.
PY := .venv/bin/python
STAMP := .venv/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test install bench clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/dataprep.py
	$(PY) bench/loader.py

clean:
	rm -rf runs .pytest_cache
