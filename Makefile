# Two commands for a fresh checkout (see README):
#   make demo   set everything up, run the example workflows headless, draw the world grid and the trained demo
#               adapters (base / content / style / composed), print where the images are
#   make test   set everything up and run the test suite (the browser suite included; heavy twins: make test-full)
PYTHON := .venv/bin/python
DEMO_WORKFLOWS := $(wildcard workflows/api/*.json)

.PHONY: setup demo test test-full test-unit test-browser screenshots lint workflows world evaluate reliability demo-adapters judge-adapters block-split benchmark clean

setup:
	bash scripts/setup_host.sh

demo: setup
	$(PYTHON) scripts/run_workflows.py $(DEMO_WORKFLOWS)
	$(PYTHON) scripts/world_grid.py
	$(PYTHON) scripts/demo_adapters_grid.py

test: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -m "not full"

# Everything make test runs, plus the heavy end-to-end cases whose faster twin make test runs (marked full: every
# workflow run from the browser, the benchmark smoke in one process and its style-alone pass, world training cut and
# resumed).
test-full: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest

test-unit: setup
	$(PYTHON) -m pytest tests/unit

# The browser suite alone (make test runs it too, with one workflow run from the UI; this runs all of them).
test-browser: setup
	$(PYTHON) -m pytest -m browser tests/e2e/test_browser.py

# The browser suite, writing its screenshots into docs/screenshots/ (the README's pictures) and the template cards.
screenshots: setup
	CSA_WRITE_SCREENSHOTS=1 $(PYTHON) -m pytest -m browser tests/e2e/test_browser.py

workflows: setup
	$(PYTHON) scripts/workflow_formats.py --write

# Retrain the miniature world's base model and its evaluators, then measure it: the base run (VAE fine-tuned inside the
# committed weights, UNet 3000 steps from scratch), then two runs of the reading-order recipe on the wide canvas that
# continue it in place (2400 and 2800 steps). About 3 hours (the last two runs 87 minutes here); a train_world.py command cut off
# part-way goes on from its saved state when that command is run again by hand (train_world.py --state-every).
WORLD_RECIPE := --wide-scenes --scene-share 0.75 --reading-order 0.9 --lr 2e-4
world: setup
	$(PYTHON) bench/world/evaluators.py train
	$(PYTHON) bench/world/train_world.py
	$(PYTHON) bench/world/train_world.py --unet-from bench/world/weights/world_unet_vae.safetensors $(WORLD_RECIPE) --unet-steps 2400
	$(PYTHON) bench/world/train_world.py --unet-from bench/world/weights/world_unet_vae.safetensors $(WORLD_RECIPE) --unet-steps 2800
	bash scripts/setup_host.sh
	$(PYTHON) bench/world/evaluate.py

evaluate: setup
	$(PYTHON) bench/world/evaluate.py

# 50 prompts queued at once against the same prompts run alone, and 5000 fuzzed files (make test runs a smoke size).
reliability: setup
	$(PYTHON) bench/reliability.py

# Retrain the committed world demo adapters with the pack's trainers (each at most 3 CPU minutes, but B4M's content run
# about 70, its style run 20 and Make 12) and judge them; block-split is the measurement behind ConsisLoRA's world /
# SD1.5 block split.
demo-adapters: setup
	$(PYTHON) bench/world/train_demo_adapters.py
	$(PYTHON) bench/world/train_b4m_residual_demos.py

# Judge the committed demo adapters again on the current world checkpoint, without retraining them.
judge-adapters: setup
	$(PYTHON) bench/world/judge_demo_adapters.py

block-split: setup
	$(PYTHON) bench/world/block_split.py

# Does each method combine a held-out content and style better than the naive sum of two LoRAs? Both protocols, in one
# command: first the block premise on the entangled references (block_split.py --premise), then the entangled protocol
# (the papers' setting: one style / one shape per reference, in 1 and in 6 pictures), then the disentangled one (the
# content in every base style, the style on every base shape). Every method's adapters are trained with the pack's
# trainers, composed, sampled and judged; two worker processes of one thread each. Appends the tables to
# bench/RESULTS.md, writes bench/world/benchmark/ (entangled/ for the first protocol: contact sheets, charts, JSON).
# Sized to about 2.3 hours wall on this 2-core machine by the benchmark's --estimate (premise ~0.2 h, entangled 2 pairs x
# 3 cases x 1 seed ~1.5 h, disentangled 2 pairs x 1 seed ~0.6 h); the one-pair entangled run of 2026-12-08 took 88
# minutes beside other jobs. More seeds: pass --seeds to the scripts (each seed adds about the same again).
BENCHMARK_ENTANGLED := --protocol entangled --pairs 2 --seeds 1 --steps 250
BENCHMARK_DISENTANGLED := --pairs 2 --seeds 1 --steps 250
benchmark: setup
	OMP_NUM_THREADS=1 $(PYTHON) bench/world/block_split.py --premise --lr 5e-3 --seeds 8
	OMP_NUM_THREADS=1 $(PYTHON) bench/world/method_benchmark.py $(BENCHMARK_ENTANGLED)
	OMP_NUM_THREADS=1 $(PYTHON) bench/world/method_benchmark.py $(BENCHMARK_DISENTANGLED)

clean:
	rm -rf .venv .host .cache
