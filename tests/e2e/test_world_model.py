"""The miniature world's base model draws what it is asked to, through a real server."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import comfy_host
from world_grid import caption_graph

sys.path.insert(0, str(comfy_host.REPO_ROOT / "bench" / "world"))
from evaluators import classify, load  # noqa: E402
from world import caption  # noqa: E402

# A smoke sample: one caption per style and per shape (the diagonal of shapes x styles), 2 seeds each.
SMOKE_CAPTIONS = [("circle", "red"), ("square", "striped"), ("triangle", "dotted"), ("cross", "checkered"),
                  ("ring", "gradient"), ("diamond", "red")]
# Stated smoke rates. The full evaluation (bench/world/evaluate.py, 120 images) is in bench/RESULTS.md; these
# thresholds sit below it so that a correct model passes on this small sample, and a random or broken one
# (chance: 1/8 content, 1/7 style) cannot.
MIN_CONTENT, MIN_STYLE = 0.75, 0.75


@pytest.mark.e2e
def test_world_model_draws_its_captions_through_the_server(comfy_server):
    evaluators, _ = load()
    content_hits, style_hits = [], []
    for shape, style in SMOKE_CAPTIONS:
        result = comfy_server.run_prompt(caption_graph(caption(shape, style), 1000, 2, f"csa/test_world/{shape}"))
        pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in result.output_images])
        assert pixels.shape == (2, 64, 64, 3)
        shapes, styles = classify(evaluators, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255)
        content_hits += [s == shape for s in shapes]
        style_hits += [s == style for s in styles]
    content, style = np.mean(content_hits), np.mean(style_hits)
    assert content >= MIN_CONTENT and style >= MIN_STYLE, f"content {content:.0%}, style {style:.0%}"
