# Two commands for a fresh checkout (see README):
#   make demo   set everything up, run the example workflows headless, print where the images are
#   make test   set everything up and run the whole test suite
PYTHON := .venv/bin/python
DEMO_WORKFLOWS := $(wildcard workflows/api/*.json)

.PHONY: setup demo test test-unit lint workflows bench clean

setup:
	bash scripts/setup_host.sh

demo: setup
	$(PYTHON) scripts/run_workflows.py $(DEMO_WORKFLOWS)

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

test-unit: setup
	$(PYTHON) -m pytest tests/unit

workflows: setup
	$(PYTHON) scripts/workflow_formats.py --write

clean:
	rm -rf .venv .host .cache
