# Every target bootstraps its own virtualenv, so on a fresh clone
# `make serve` and `make test` are the only two commands that matter.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: serve serve-postgres test lint typecheck unit conformance clean install \
	bench bench-quick bench-smoke

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,postgres,sqs]'
	touch $(STAMP)

install: $(STAMP)

# The benchmark harness's peers (pgqueuer, asyncpg, procrastinate) and plots
# (matplotlib) come with the [bench] extra; nothing at runtime needs them.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,postgres,sqs,bench]'
	touch $(BENCH_STAMP)

serve: $(STAMP)
	$(BIN)/ojs-trio serve --host 127.0.0.1 --port $${OJS_PORT:-8080} --storage $${OJS_STORAGE:-memory://}

# PostgreSQL storage: the database in DATABASE_URL (created if missing), migrated on start.
DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/ojs
serve-postgres: $(STAMP)
	-psql "$(dir $(DATABASE_URL))postgres" -qc "CREATE DATABASE $(notdir $(DATABASE_URL))" 2>/dev/null
	$(BIN)/ojs-trio serve --host 127.0.0.1 --port $${OJS_PORT:-8080} --storage $(DATABASE_URL)

lint: $(STAMP)
	$(BIN)/ruff check ojs_trio tests examples bench
	$(BIN)/ruff format --check ojs_trio tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy

# The conformance cases mostly wait on timers (retry backoff, cron minutes), so
# they run spread over several pytest workers; each starts its own server.
PYTEST_WORKERS ?= 8

# The multi-process tests (two servers on PostgreSQL and on SQS, kill -9,
# database restart) are timing-sensitive under load, so they run on their own
# after the rest.
unit: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --ignore=tests/test_pg_cluster.py --ignore=tests/test_sqs_cluster.py
	$(BIN)/pytest -q tests/test_pg_cluster.py tests/test_sqs_cluster.py

conformance: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) tests/test_conformance.py

# Benchmarks (bench/README.md). Results: bench/results/latest.{md,json} and
# timestamped copies. PostgreSQL at $(BENCH_DATABASE_URL), dropped and created per run.
BENCH_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/ojs_bench
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench --pg-url $(BENCH_DATABASE_URL)

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick --pg-url $(BENCH_DATABASE_URL)

# Part of `make test`: every scenario at tiny sizes so the harness never rots. No
# timing assertions; needs only the dev extras (peers and plots are skipped without
# the [bench] extra, PostgreSQL when it is not reachable); writes to a temp dir.
BENCH_SMOKE_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/ojs_bench_smoke
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke --no-progress --storage memory,postgres,sqs --pg-url $(BENCH_SMOKE_DATABASE_URL)

test: lint typecheck unit bench-smoke

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
