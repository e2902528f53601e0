# recsys-pipeline: `make run` runs the weekly DAG on the bundled sample, `make test` runs the tests.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV := .venv
BIN := $(VENV)/bin
RECSYS := $(BIN)/recsys
# The day after the bundled MovieLens-100k sample ends: the run sees all of it.
DATE ?= 1998-04-23
NAME ?=
export OPENBLAS_NUM_THREADS := 1

## help: list the targets
help:
	@sed -n 's/^## //p' $(MAKEFILE_LIST) | column -t -s ':'

# The installer's own output goes to a log (hundreds of lines a user need not read); a failure shows
# its end.
SETUP_LOG = $${RECSYS_HOME:-var}/logs/setup.log

$(BIN)/.installed: pyproject.toml
	@python_bin=$$(scripts/check_prereqs.sh) || exit 1; \
	  mkdir -p $$(dirname $(SETUP_LOG)); log=$(SETUP_LOG); \
	  echo "setup: installing recsys-pipeline and its dependencies into $(VENV) with $$($$python_bin --version)"; \
	  echo "setup: a few minutes the first time (installer output in $$log)"; \
	  { [ -x $(BIN)/python ] || $$python_bin -m venv $(VENV); } > $$log 2>&1 \
	  && $(BIN)/python -m pip install --upgrade pip >> $$log 2>&1 \
	  && $(BIN)/python -m pip install -e '.[dev]' >> $$log 2>&1 \
	  || { tail -n 20 $$log; echo "setup: FAILED (full output in $$log)"; exit 1; }
	@touch $@
	@echo "setup: done"

## setup: check Python 3.11 and Java 17+, create .venv and install the project
setup: $(BIN)/.installed

## init: create the Airflow and MLflow state under var/ (or $RECSYS_HOME), and archive the Spark driver's classes once
init: setup
	@mkdir -p $$(dirname $(SETUP_LOG)); $(RECSYS) airflow db migrate > $(SETUP_LOG).init 2>&1 \
	  || { tail -n 20 $(SETUP_LOG).init; echo "init: FAILED (full output in $(SETUP_LOG).init)"; exit 1; }
	@$(MAKE) -s spark-archive

# Every Spark job's driver starts from this archive of Spark's classes (docs/operations.md).
spark-archive: setup
	@$(RECSYS) spark-archive | grep -v " exists$$" || true

# Where `make run`/`make nightly` keep a DAG run's full output: the screen gets the summary.
RUN_LOGS = $${RECSYS_HOME:-var}/logs

## run: run the weekly DAG end to end for DATE (default 1998-04-23) and show what was published
run: init
	@$(MAKE) -s dag-run DAG=recsys_weekly

## nightly: fold the day before DATE into the champion with the nightly DAG (after make run)
nightly: init
	@$(MAKE) -s dag-run DAG=recsys_nightly

dag-run:
	@mkdir -p $(RUN_LOGS); log=$(RUN_LOGS)/$(DAG)-$(DATE).log; \
	  echo "$(DAG) for $(DATE): running (full output in $$log)"; \
	  if $(RECSYS) airflow dags test $(DAG) $(DATE) > $$log 2>&1; then \
	    echo "$(DAG) for $(DATE): succeeded"; $(RECSYS) status; \
	  else \
	    grep -E "failed|Error" $$log | grep -v "^\s*at " | tail -n 5; \
	    echo "$(DAG) for $(DATE): FAILED (full output in $$log)"; $(RECSYS) status; exit 1; \
	  fi

## test: run the test suite: unit, spark and e2e tiers (whole DAG runs and servers included), two files at a time
test: init
	$(BIN)/pytest -n 2 --dist loadfile --durations=15 -m "not slow"

## test-slow: the slow tier: a real Airflow scheduler and API server, triggers, a backfill, a Spark cluster, mlflow models serve, the client installed alone
test-slow: init
	$(BIN)/pytest --durations=5 -m "slow and not deploy"

## test-deploy: a deployment on loopback: Airflow on PostgreSQL with Celery workers and Redis, an MLflow server on PostgreSQL, both lock backends, recsys doctor (installs the servers first)
test-deploy: init servers
	$(BIN)/pytest --durations=5 -m deploy

## servers: install the servers the slow tier runs against, from Debian's packages (postgresql, redis-server; needs root)
servers:
	@{ ls /usr/lib/postgresql/*/bin/initdb && command -v redis-server; } > /dev/null 2>&1 || { \
	  [ "$$(id -u)" = 0 ] || { echo "servers: install Debian's postgresql and redis-server (as root: make servers)"; exit 1; }; \
	  echo "servers: installing postgresql and redis-server (apt-get)"; \
	  apt-get update -qq > /dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql redis-server > /dev/null; }

## test-fast: run the unit tier only (no Spark, no servers; under a minute)
test-fast: setup
	$(BIN)/pytest -m unit

## lint: ruff and mypy
lint: setup
	$(BIN)/ruff check recsys_pipeline dags jobs tests benchmarks
	$(BIN)/mypy

# The peers the benchmarks run beside ours (cornac's BPR, Faiss, hnswlib): the `bench` extra.
$(BIN)/.bench-installed: $(BIN)/.installed
	@log=$(SETUP_LOG); echo "bench: installing the benchmarks' peers (cornac, faiss, hnswlib; output in $$log)"; \
	  $(BIN)/python -m pip install -e '.[dev,bench]' >> $$log 2>&1 \
	  || { tail -n 20 $$log; echo "bench: FAILED to install the peers (full output in $$log)"; exit 1; }
	@touch $@

## bench: run every benchmark, or one with NAME=x (writes var/bench/x.json); PARAMS="k=v ..." for a one-off
bench: $(BIN)/.bench-installed spark-archive
	$(BIN)/python -m benchmarks $(NAME) $(PARAMS)

.PHONY: help setup init spark-archive run test test-slow test-fast lint bench
