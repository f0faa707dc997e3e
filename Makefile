# The README's commands. Each target makes (or reuses) the virtualenv by itself, so a
# fresh clone needs nothing else: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test unit lint bench chaos clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fleet demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	$(BIN)/python -m bench

# The fleet under load and faults, every invariant checked: CHAOS_SECONDS (120), CHAOS_SEED.
chaos: $(STAMP)
	$(BIN)/python -m chaos

clean:
	rm -rf $(VENV) .fleet .pytest_cache .mypy_cache .ruff_cache
