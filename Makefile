# labfleet — one entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=

DURATION ?= 60
SPEED ?= 60

.PHONY: help venv test test-fast lint bench demo

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

venv: $(STAMP) ## create the project virtualenv at .venv/ with every dependency group

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[recorder,vboard,provision,dev]'
	touch $(STAMP)

demo: venv ## broker + 3 virtual boards provisioned via site.yml + recorder, live table, plots [DURATION=60 SPEED=60]
	$(PY) -m vboard.demo --duration $(DURATION) --speed $(SPEED)

test: venv ## run the whole test suite (needs mosquitto on PATH: .ci/run installs it)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv ## the suite without the slow scenarios
	$(PY) -m pytest -m 'not slow' $(PYTEST_ARGS)

lint: venv lint-ansible ## ruff, mypy, ansible-lint (production profile) and the playbook syntax check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: venv ## run the benchmarks; writes bench/results.json and bench/REPORT.md (ONLY=name to pick)
	$(PY) bench/run.py $(if $(ONLY),--only $(ONLY))

include provision.mk
