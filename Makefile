# fleetmedic: two commands on a fresh machine.
#   make demo   run the system (ops DB, Redis, demo fleet, Airflow) and show a fault fixed
#   make test   install what is needed and run every test (lint, unit, integration, end to end)
#   make stop   stop everything `make demo` started

SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: bootstrap demo demo-up stop test lint unit e2e bench freeze clean

bootstrap:
	@bash scripts/bootstrap.sh

demo: bootstrap
	@$(BIN)/fleetmedic demo up
	@echo
	@echo "Showing a real fault found and fixed: stopping PostgreSQL pg1a ..."
	@$(BIN)/fleetmedic demo show pg1a
	@echo
	@echo "Everything keeps running. Try: $(BIN)/fleetmedic fleet ls | incidents list | --help"
	@echo "Stop it with: make stop"

demo-up: bootstrap
	@$(BIN)/fleetmedic demo up

stop:
	@if [ -x $(BIN)/fleetmedic ]; then $(BIN)/fleetmedic demo down; else echo "nothing to stop (no .venv)"; fi

lint: bootstrap
	@echo "== ruff"
	@$(BIN)/ruff check include dags plugins tests bench

test:
	@bash scripts/bootstrap.sh --test
	@echo "== ruff"
	@$(BIN)/ruff check include dags plugins tests bench
	@echo "== pytest (unit, integration, DAG policy, end to end)"
	@$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

unit: bootstrap
	@$(BIN)/pytest -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)

e2e: bootstrap
	@$(BIN)/pytest -p no:cacheprovider -m e2e $(PYTEST_ARGS)

bench: bootstrap
	@$(BIN)/python bench/bench_detection.py
	@$(BIN)/python bench/bench_reports.py

freeze:
	@{ echo "# Exact pins for fleetmedic (Python 3.11). Regenerate with: make freeze"; \
	   $(BIN)/pip freeze --exclude-editable | grep -v '^fleetmedic'; } > requirements.txt

clean: stop
	rm -rf .local
