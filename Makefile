# Set-up and main jobs. torch is installed first, pinned: a bare torch requirement on a machine
# without torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup quickstart test lint bench clean

$(BIN)/lmtune: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/lmtune

setup: $(BIN)/lmtune

quickstart: setup
	$(BIN)/lmtune train examples/quickstart.yaml overwrite_output_dir=true
	$(BIN)/lmtune chat out/quickstart --prompt "What is your name?"

# The oldest transformers pyproject allows, beside the venv: the tests load lmtune's model folders with it.
OLDEST_TRANSFORMERS := $(VENV)/oldest-transformers
$(OLDEST_TRANSFORMERS): pyproject.toml
	rm -rf $@
	$(BIN)/pip install --quiet --target $@ \
		"transformers==$$(sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)"

# Test files run side by side (pytest-xdist): much of a test's time is a subprocess starting or a browser
# waiting, not arithmetic. A file stays on one worker, so its module fixtures are built once; files go to the
# workers longest first (tests/conftest.py's LONGEST_FILES).
test: setup $(OLDEST_TRANSFORMERS)
	LMTUNE_OLD_TRANSFORMERS=$(CURDIR)/$(OLDEST_TRANSFORMERS) $(BIN)/python -m pytest -q -n auto --maxprocesses 4 \
		--dist loadfile --no-loadscope-reorder --durations 25

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) out
