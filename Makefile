# `make demo` and `make test` do all of their own set-up on a fresh machine.
PY := .venv/bin/python
STAMP := .venv/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# DeepSpeed's JIT-built C++ ops (its CPU collective, cpu_adam) kept beside this environment: ~/.cache's one folder
# is rebuilt whenever another environment loads them (tests/conftest.py says more)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.venv/torch_extensions

.PHONY: demo test test-fast install bench gpu-smoke clean

# EXTRAS: the DALI build for the machine's CUDA major version (cu12 or cu13); its CPU pipelines need no GPU.
EXTRAS ?= dev,cu12

$(STAMP): setup.py constraints/local.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c constraints/local.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# the edit loop: every test but the multi-minute ones (real multi-rank training, SLURM/pdsh; the `slow` marker)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/dataprep.py
	$(PY) bench/loader.py

# one GPU, offline (bench/README.md): the machine's torch plus .gpu_carry/, never .venv (install downloads);
# results in runs/gpu_smoke (OUT=...)
gpu-smoke:
	bash bench/gpu_smoke.sh

clean:
	rm -rf runs .pytest_cache
