# Stratus. `make run` serves the demo site; `make test` runs the whole suite.
# Both install what they need on a fresh Debian 12 machine (root or sudo).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
export SITE_URL ?= http://$(HOST):$(PORT)

.PHONY: run test lint format system-run system-test migrate demo serve clean

run: system-run $(VENV)/.run-deps migrate demo serve

test: system-test $(VENV)/.dev-deps lint
	$(PY) -m pytest

system-run:
	@scripts/setup-system.sh run

system-test:
	@scripts/setup-system.sh test

$(VENV)/bin/python:
	"$$(scripts/find-python.sh)" -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.run-deps: requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-deps: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.run-deps

lint: $(VENV)/.dev-deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev-deps
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

migrate:
	$(PY) manage.py migrate --no-input

demo:
	$(PY) manage.py load_demo

serve:
	@echo "Stratus is at http://$(HOST):$(PORT)/  (Ctrl-C stops it)"
	$(PY) -m uvicorn portal.asgi:application --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) var
