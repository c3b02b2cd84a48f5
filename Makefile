# Developer shortcuts. Tools come from ./.venv when it exists, else from PATH.
#   make test    the test suite (PGTASKS_TEST_DSN=... to use your own server)
#   make lint    ruff, ruff format --check, mypy --strict
#   make docs    the documentation site, built strictly into $(SITE)
#   make bench   every benchmark in benchmarks/ (needs: pip install -e '.[bench]');
#                pass options with BENCH_ARGS="--dsn postgresql://... --runs 5"
#   make ci      the CI script

VENV ?= .venv
BIN := $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/,)
PYTHON ?= $(BIN)python
SITE ?= site
BENCH_ARGS ?=
BENCHMARKS := $(sort $(filter-out benchmarks/_%,$(wildcard benchmarks/*.py)))

.PHONY: test lint docs docs-serve bench ci

test:
	$(BIN)pytest

lint:
	$(BIN)ruff check .
	$(BIN)ruff format --check .
	$(BIN)mypy --strict src tests

docs:
	$(BIN)mkdocs build --strict -d $(SITE)

docs-serve:
	$(BIN)mkdocs serve

bench:
	@test -n "$(BENCHMARKS)" || { echo "no benchmarks found in benchmarks/"; exit 1; }
	@set -e; for b in $(BENCHMARKS); do \
		echo "== $$b"; \
		$(PYTHON) $$b $(BENCH_ARGS); \
	done

ci:
	bash .ci/run
