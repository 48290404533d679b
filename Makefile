# Entry points: `make demo` and `make test` install what they need first (a virtualenv in .venv).
# Python packages are installed with uv, whose cache (~/.cache/uv) keeps torch from being
# downloaded again on the next clean checkout; OpenSearch zips are cached by `sidecar` itself.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_PORT ?= 9200
DEMO_INDEX ?= demo-pydoc

.PHONY: install prometheus-bin test lint format demo demo-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[test]'
	touch $@

test: $(STAMP) prometheus-bin
	$(BIN)/pytest

# The integration tests scrape the sidecar with a real Prometheus (Debian's `prometheus`).
# Only the binary is wanted: a policy-rc.d that denies service starts is put in place for the
# install (when none exists), so no daemon is started on port 9090 and none can fail the install.
prometheus-bin:
	@if [ -n "$$PROMETHEUS_BIN" ] || command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		policy=/usr/sbin/policy-rc.d; \
		if [ ! -e $$policy ]; then \
			trap "rm -f $$policy" EXIT; \
			printf '#!/bin/sh\nexit 101\n' >$$policy && chmod +x $$policy; \
		fi; \
		echo "Installing Prometheus (Debian package prometheus) for the integration tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	else \
		echo "The integration tests need Prometheus: install the Debian/Ubuntu package 'prometheus'" \
			"(apt-get install prometheus) or set PROMETHEUS_BIN to a prometheus binary." >&2; \
		exit 1; \
	fi

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
