# The front door: `make run` sets everything up, loads and processes a demo backlog on the embedded
# PostgreSQL, then serves the Dagster UI on http://127.0.0.1:3000 (Ctrl-C stops it);
# `make demo` does the first part only; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run demo dev test lint stop clean

$(BIN)/dlq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/dlq

run: demo dev

demo: install
	$(BIN)/dlq demo --dagster

dev: install
	$(BIN)/dlq dev

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

stop: install
	$(BIN)/dlq db stop

clean: stop
	rm -rf .dlq
