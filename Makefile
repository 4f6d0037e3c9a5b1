# The two commands of the README. Both set up what they need first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve demo test lint

setup:
	./scripts/setup.sh

serve: setup
	$(VENV)/bin/pacs-triage serve

demo: setup
	$(VENV)/bin/pacs-triage demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint:
	$(VENV)/bin/ruff check .
