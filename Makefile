# The front door: `make run` sets everything up and runs the demo on the embedded PostgreSQL;
# `make test` runs the test suite (against a throwaway embedded server, or $DLQ_TEST_DATABASE_URL).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint stop clean

$(BIN)/dlq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/dlq

run: install
	$(BIN)/dlq demo

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

stop: install
	$(BIN)/dlq db stop

clean: stop
	rm -rf .dlq
