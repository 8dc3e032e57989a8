# The two commands of the README: `make run` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint proto bench clean postgres-server

$(VENV)/.run-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.run-installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

## run: start meshca in dev mode (local CA + token issuer) and issue a demo certificate
run: $(VENV)/.run-installed
	$(VENV)/bin/meshca dev serve --demo

## test: lint, check the layering, and run the whole test suite (integration included)
test: $(VENV)/.test-installed postgres-server lint
	$(PY) -m pytest -q

# The integration tests start a real PostgreSQL 15; install its server if it is missing.
postgres-server:
	@test -x /usr/lib/postgresql/15/bin/postgres || { \
	  echo "installing postgresql-15 (needed by the integration tests)"; \
	  apt-get update -qq && apt-get install -y -qq postgresql-15 >/dev/null; }

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check meshca tests tools bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy meshca

## proto: regenerate the gRPC stubs in meshca/adapters/grpc/_gen from proto/
proto: $(VENV)/.test-installed
	$(PY) tools/gen_protos.py

## bench: issue 8's five targets against OpenBao's PKI engine, same machine (see bench/README.md)
bench: $(VENV)/.test-installed
	$(PY) bench/targets.py

clean:
	rm -rf $(VENV) meshca-dev .pytest_cache .mypy_cache .ruff_cache .hypothesis
