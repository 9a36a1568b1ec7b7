# Two front-door commands; each creates or refreshes the virtual environment first.
#   make demo   — a 1–3 minute tour (multi-task vs single-task on penguins and schools)
#   make test   — the whole test suite (what CI runs), then ruff and mypy
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mtml-installed

.PHONY: venv sysdata demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages holding offline data (fonts, Fashion-MNIST, fortunes); installs only what is missing.
sysdata:
	bash scripts/install-system-data.sh

demo: $(STAMP)
	$(BIN)/mtml demo

# The suite runs in TEST_WORKERS processes (pytest-xdist; `auto`: one per core), each test file on one worker
# (--dist loadfile: a file's tests share module state and fixtures as they do in one process).
TEST_WORKERS ?= auto

test: $(STAMP) sysdata
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25
	$(MAKE) --no-print-directory lint

test-fast: $(STAMP) sysdata
	$(BIN)/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
