# Entry points: `make demo` and `make test` install what they need first (a virtualenv in .venv).
# Python packages are installed with uv, whose cache (~/.cache/uv) keeps torch from being
# downloaded again on the next clean checkout; OpenSearch zips are cached by `sidecar` itself.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO_PORT ?= 9200
DEMO_INDEX ?= demo-pydoc

.PHONY: install prometheus-bin redis-bin docker-bin bench-tools test lint format demo demo-down demo-clean clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade uv
	$(BIN)/uv pip install --python $(BIN)/python -e '.[test]'
	touch $@

test: $(STAMP) prometheus-bin redis-bin docker-bin
	$(BIN)/pytest

# `$(call debian-binary,VARIABLE,binary,package,what)`: nothing when $VARIABLE names the binary or
# it is installed; else, as root with apt, the Debian package. Only the binary is wanted: a
# policy-rc.d that denies service starts is put in place for the install (when none exists), so no
# daemon is started on its port and none can fail the install.
define debian-binary
	@if [ -n "$${$(1):-}" ] || command -v $(2) >/dev/null 2>&1 || [ -x /usr/bin/$(2) ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		policy=/usr/sbin/policy-rc.d; \
		if [ ! -e $$policy ]; then \
			trap "rm -f $$policy" EXIT; \
			printf '#!/bin/sh\nexit 101\n' >$$policy && chmod +x $$policy; \
		fi; \
		echo "Installing $(4) (Debian package $(3)) for the integration tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $(3) >/dev/null; \
	else \
		echo "The integration tests need $(4): install the Debian/Ubuntu package '$(3)'" \
			"(apt-get install $(3)) or set $(1) to a $(2) binary." >&2; \
		exit 1; \
	fi
endef

# The integration tests scrape the sidecar with a real Prometheus (Debian's `prometheus`).
prometheus-bin:
	$(call debian-binary,PROMETHEUS_BIN,prometheus,prometheus,Prometheus)

# The shared score cache's tests run a real Redis (Debian's `redis-server`), one per test.
redis-bin:
	$(call debian-binary,REDIS_SERVER_BIN,redis-server,redis-server,a Redis server)

# The container tests build and run the shipped image on Debian's Docker engine (docker.io; the
# tests start their own dockerd and stop it), make its base image with debootstrap (there is no
# registry to pull one from) and validate the compose file with docker-compose.
docker-bin:
	$(call debian-binary,DOCKERD_BIN,dockerd,docker.io,a Docker engine)
	$(call debian-binary,DEBOOTSTRAP_BIN,debootstrap,debootstrap,debootstrap)
	$(call debian-binary,DOCKER_COMPOSE_BIN,docker-compose,docker-compose,docker-compose)

# `sidecar bench --pass-through` drives its load with wrk (Debian's `wrk`); `make test` never needs it.
bench-tools:
	@if command -v wrk >/dev/null 2>&1; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "Installing wrk (Debian package wrk) for sidecar bench --pass-through"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends wrk >/dev/null; \
	else \
		echo "sidecar bench --pass-through needs wrk: apt-get install wrk" >&2; \
		exit 1; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The demo's OpenSearch node keeps running after `make demo` (the commands it prints use it);
# `make demo-down` stops it, `make demo-clean` stops it and deletes its install and data.
demo: $(STAMP)
	$(BIN)/sidecar opensearch up --port $(DEMO_PORT)
	$(BIN)/sidecar demo --index $(DEMO_INDEX) --opensearch http://127.0.0.1:$(DEMO_PORT)

demo-down: $(STAMP)
	$(BIN)/sidecar opensearch down --port $(DEMO_PORT)

demo-clean: $(STAMP)
	$(BIN)/sidecar opensearch down --port $(DEMO_PORT) --purge

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
