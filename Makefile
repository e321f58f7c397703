# kepler-log: one entry point for operators and CI. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
BIN         := $(VENV)/bin
PY          := $(BIN)/python
MODULE      ?= portal
SCENARIO    ?=
AGENT_DIR   := files/python-agent
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help deps system-deps docker venv base-images kafka-dist wheelhouse image lint \
        test-python test-rules molecule test bench demo demo-down status clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

deps: system-deps venv docker ## Install the toolchain (.venv), system packages and a Docker engine

system-deps:
	@scripts/system-deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt $(AGENT_DIR)/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q -e $(AGENT_DIR)
	@touch $@

docker:
	@scripts/docker-bootstrap.sh

base-images: docker ## Build the local Debian 12 base images (no registry)
	@scripts/base-images.sh

kafka-dist: ## Assemble the Apache Kafka distribution from Maven Central into dist/kafka
	@scripts/kafka-dist.sh

wheelhouse: venv ## Build keplerlog and its dependencies as wheels into dist/wheelhouse
	@scripts/wheelhouse.sh

image: deps base-images wheelhouse ## Build a service image: make image MODULE=portal
	@scripts/build-image.sh $(MODULE)

lint: venv ## ansible-lint (production profile), yamllint, ruff
	@scripts/timed.sh lint bash -ec '$(BIN)/yamllint --strict . && $(BIN)/ansible-lint \
	  && $(BIN)/ruff check . && $(BIN)/ruff format --check .'

test-python: venv kafka-dist ## The Python suite (agent, consumer, prune) against a real Kafka
	@cd $(AGENT_DIR) && ../../scripts/timed.sh test-python ../../$(BIN)/pytest -q -p no:cacheprovider

molecule: deps base-images kafka-dist wheelhouse ## Molecule scenarios (SCENARIO="-s kafka" for one)
	@scripts/timed.sh molecule scripts/molecule-scenarios.sh $(SCENARIO)

test-rules: venv ## promtool check + unit tests of the alert rules; the dashboard's queries parse
	@scripts/timed.sh test-rules scripts/test-rules.sh

test: deps lint test-rules test-python molecule ## Everything CI runs: lint, alert rules, Python tests, all Molecule scenarios

bench: deps kafka-dist ## Benchmarks vs kcat, rsyslog, Flume NG: bench/results and the README
	@scripts/bench-deps.sh
	$(PY) bench/run.py

demo: deps base-images kafka-dist wheelhouse ## Bring up the whole pipeline in local containers
	@scripts/demo.sh up

status: ## The lab pipeline at a glance from Prometheus (WATCH=5 redraws until Ctrl-C)
	@$(PY) scripts/status.py $(if $(WATCH),--watch $(WATCH))

demo-down: ## Remove the local lab
	@scripts/demo.sh down

clean: ## Remove build outputs (keeps .venv and images)
	rm -rf dist build $(AGENT_DIR)/build $(AGENT_DIR)/*.egg-info
