"""Draw every base caption of the miniature world with the world base model, through a real server.

    .venv/bin/python scripts/world_grid.py [--seeds 4]

Writes one grid (rows: captions, columns: seeds) to the server's output folder and prints its path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from model_names import WORLD_CHECKPOINT_NAME
from comfy_host import REPO_ROOT, ComfyServer

sys.path.insert(0, str(REPO_ROOT / "bench" / "world"))
from world import BASE_SHAPES, BASE_STYLES, caption  # noqa: E402


def caption_graph(text: str, seed: int, batch: int, prefix: str, steps: int = 20, model: list | None = None,
                  model_nodes: dict | None = None, positive: list | None = None) -> dict:
    """API graph: the world checkpoint, one caption, a batch of seeds, saved images. ``model_nodes`` (ids from 20 on)
    may change the MODEL the sampler uses (``model``, default the checkpoint's) and its positive conditioning
    (``positive``, default the caption's CLIPTextEncode)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": WORLD_CHECKPOINT_NAME}},
        **(model_nodes or {}),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "5": {"class_type": "KSampler", "inputs": {"model": model or ["1", 0], "seed": seed, "steps": steps, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": positive or ["2", 0],
                                                   "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def grid_arguments(description: str, seeds: int, smoke_help: str) -> argparse.Namespace:
    """The options of a script that draws a grid through a real server; --smoke: one seed, two steps."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base", type=Path, default=REPO_ROOT / ".host" / "base")
    parser.add_argument("--smoke", action="store_true", help=f"{smoke_help} (what make test runs)")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps = 1, 2
    return args


def pictures_side_by_side(result) -> np.ndarray:
    """A prompt's saved images (one per seed) as one row of pixels."""
    return np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in result.output_images], 1)


def main() -> int:
    args = grid_arguments(__doc__.splitlines()[0], 4, "one caption, one seed, two steps")
    pairs = [(shape, style) for shape in BASE_SHAPES for style in BASE_STYLES]
    if args.smoke:
        pairs = pairs[:1]
    rows = []
    with ComfyServer(args.base) as server:
        for shape, style in pairs:
            graph = caption_graph(caption(shape, style), 1000, args.seeds, f"csa/world/{shape}_{style}", args.steps)
            rows.append(pictures_side_by_side(server.run_prompt(graph)))
    grid = args.base / "output" / "csa" / "world_grid.png"
    Image.fromarray(np.concatenate(rows, 0)).save(grid)
    print(f"world grid ({len(rows)} captions x {args.seeds} seeds, rows: {', '.join(BASE_STYLES)} per shape): {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
