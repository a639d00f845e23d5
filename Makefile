# Two commands for a new machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0

.PHONY: venv kernels demo test test-interop clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so that nothing later resolves to a CUDA build.
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[test,plot]'
	touch $@

venv: $(VENV)/.installed

# The fused CPU kernels (C++, about half a minute once; cached by source hash in ~/.cache/lowbit/kernels).
# Never fatal: without a compiler every module keeps its Python path.
kernels: venv
	$(PY) -m lowbit.kernels.native

# The comparison table on the bundled model; 32 calibration windows keep the calibrated methods quick.
DEMO_METHODS ?= fp16,rtn-int8,rtn-int4-g128,gptq-int4-g128,nf4,q4_k_m

demo: kernels
	$(VENV)/bin/lowbit demo
	$(VENV)/bin/lowbit compare --methods $(DEMO_METHODS) --samples 32

test: kernels
	$(PY) -m pytest

# Peer libraries for the interop tests. llama-cpp-python compiles llama.cpp from source (about ten
# minutes on two idle cores; pip caches the wheel afterwards). torch is named again, pinned, so that
# the resolver keeps the CPU wheel.
$(VENV)/.interop-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[test,interop]' $(TORCH_PIN)
	touch $@

test-interop: $(VENV)/.interop-installed
	$(PY) -m pytest -m interop

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
