# Each target does its own setup: a venv in .venv with the package installed editable.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test lint demo kafka-up kafka-down kafka-smoke clean container-test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,offline]'
	touch $(STAMP)

install: $(STAMP)

# The tests start (and stop) their own local Kafka broker once per session, unless
# KAFKA_BOOTSTRAP_SERVERS already answers.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check streamproc qa tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Builds the images from nothing and runs docker-compose.yml for real (about 15 minutes; see the
# README). Sets up a Docker engine first when this machine has none (scripts/docker_engine.sh).
container-test: install
	bash scripts/docker_engine.sh
	$(PY) -m pytest -m container tests/test_container.py -v -ra $(PYTEST_ARGS)

demo: install
	$(PY) -m streamproc demo

kafka-up:
	bash scripts/kafka.sh start

kafka-down:
	bash scripts/kafka.sh stop

kafka-smoke: install kafka-up
	$(PY) scripts/kafka_smoke.py

clean:
	bash scripts/kafka.sh stop --wipe || true
	rm -rf .pytest_cache .mypy_cache .ruff_cache
