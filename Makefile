# Entry points: `make demo` and `make test` install what they need first (a virtualenv in .venv).
# Python packages are installed with uv, whose cache (~/.cache/uv) keeps torch from being
# downloaded again on the next clean checkout; OpenSearch zips are cached by `sidecar` itself.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_PORT ?= 9200
DEMO_INDEX ?= demo-pydoc

.PHONY: install test lint format demo demo-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[test]'
	touch $@

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

demo: $(STAMP)
	$(BIN)/sidecar opensearch up --port $(DEMO_PORT)
	$(BIN)/sidecar demo --index $(DEMO_INDEX) --url http://127.0.0.1:$(DEMO_PORT)

demo-down: $(STAMP)
	$(BIN)/sidecar opensearch down --port $(DEMO_PORT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
