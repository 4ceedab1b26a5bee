# One command each for a new machine: `make run` (the main job, embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-unit typecheck lint

$(BIN)/pneumo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/pneumo

install: $(BIN)/pneumo

run: install
	$(BIN)/pneumo run

# Everything: ruff, mypy, then the whole suite (../shared, PostgreSQL and Redis needed).
test: install typecheck
	$(BIN)/ruff check .
	$(BIN)/pytest

# The fast tier: the tests that need none of ../shared, PostgreSQL and Redis (markers applied by
# tests/conftest.py from what each test uses); make test still runs them with all the others.
test-unit: install
	$(BIN)/pytest -m unit

typecheck: install
	$(BIN)/mypy

lint: install
	$(BIN)/ruff check .
