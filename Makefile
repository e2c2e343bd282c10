# Two commands for a fresh checkout (see README):
#   make demo   set everything up, run the example workflows headless and draw the world grid, print where the images are
#   make test   set everything up and run the whole test suite
PYTHON := .venv/bin/python
DEMO_WORKFLOWS := $(wildcard workflows/api/*.json)

.PHONY: setup demo test test-unit lint workflows world evaluate reliability clean

setup:
	bash scripts/setup_host.sh

demo: setup
	$(PYTHON) scripts/run_workflows.py $(DEMO_WORKFLOWS)
	$(PYTHON) scripts/world_grid.py

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

test-unit: setup
	$(PYTHON) -m pytest tests/unit

workflows: setup
	$(PYTHON) scripts/workflow_formats.py --write

# Retrain the miniature world's base model (about 50 CPU minutes here) and its evaluators, then measure it.
world: setup
	$(PYTHON) bench/world/evaluators.py train
	$(PYTHON) bench/world/train_world.py
	bash scripts/setup_host.sh
	$(PYTHON) bench/world/evaluate.py

evaluate: setup
	$(PYTHON) bench/world/evaluate.py

# 50 prompts queued at once against the same prompts run alone, and 5000 fuzzed files (make test runs a smoke size).
reliability: setup
	$(PYTHON) bench/reliability.py

clean:
	rm -rf .venv .host .cache
