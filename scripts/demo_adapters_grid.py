"""Draw the trained world demo adapters side by side through a real server: base / content / style / composed.

    .venv/bin/python scripts/demo_adapters_grid.py [--seeds 2]

One row per method (LoRA, ConsisLoRA, QR-LoRA), four cells of seeds each:

- base: the world model alone, 'a zkz sks' (it knows neither word);
- content: the content adapter (the held-out shape star, 'sks'), 'a checkered sks';
- style: the style adapter (the held-out style zigzag, 'zkz'), 'a zkz circle';
- composed: both, 'a zkz sks': LoRA applied together, ConsisLoRA's content block + style block (Compose Content
  and Style), QR-LoRA through QR Merge.

Writes the grid to the server's output folder and prints its path.
"""
from __future__ import annotations


import numpy as np
from PIL import Image

from comfy_host import ComfyServer
from model_names import WORLD_DEMO_ADAPTERS
from world_grid import caption_graph, grid_arguments, pictures_side_by_side

PROMPTS = {"base": "a zkz sks", "content": "a checkered sks", "style": "a zkz circle", "composed": "a zkz sks"}


def load(node_id: str, name: str) -> dict:
    return {node_id: {"class_type": "CSA_LoadAdapter", "inputs": {"adapter_name": name, "strength": 1.0,
                                                                  "part": "whole file", "role": "from file"}}}


def model_for(method: str, cell: str) -> tuple[dict, list]:
    """Graph nodes that make the cell's MODEL, and the MODEL output to sample with."""
    content, style = WORLD_DEMO_ADAPTERS[method]
    if cell == "base":
        return {}, ["1", 0]
    if cell in ("content", "style"):
        nodes = load("20", content if cell == "content" else style)
        nodes["21"] = {"class_type": "CSA_ApplyAdapters", "inputs": {"model": ["1", 0], "adapter": ["20", 0],
                                                                    "block_strengths": ""}}
        return nodes, ["21", 0]
    nodes = {**load("20", content), **load("22", style)}
    if method == "consislora":
        nodes["21"] = {"class_type": "CSA_ComposeContentAndStyle", "inputs": {
            "model": ["1", 0], "content_image_adapter": ["20", 0], "style_image_adapter": ["22", 0]}}
    elif method == "qr":
        nodes["21"] = {"class_type": "CSA_QRMerge", "inputs": {
            "model": ["1", 0], "content": ["20", 0], "style": ["22", 0], "lambda_content": 1.0, "lambda_style": 1.0,
            "interference": "off"}}
    else:
        nodes["21"] = {"class_type": "CSA_ApplyAdapters", "inputs": {
            "model": ["1", 0], "adapter": ["20", 0], "adapter_2": ["22", 0], "block_strengths": ""}}
    return nodes, ["21", 0]


def cell_graph(method: str, cell: str, seeds: int, steps: int) -> dict:
    nodes, model = model_for(method, cell)
    return caption_graph(PROMPTS[cell], 1000, seeds, f"csa/demo/{method}_{cell}", steps, model, nodes)


def main() -> int:
    args = grid_arguments(__doc__.splitlines()[0], 2, "one seed, two steps")
    rows = []
    with ComfyServer(args.base) as server:
        for method in WORLD_DEMO_ADAPTERS:
            cells = []
            for cell in PROMPTS:
                pictures = pictures_side_by_side(server.run_prompt(cell_graph(method, cell, args.seeds, args.steps)))
                cells.append(np.pad(pictures, ((0, 0), (0, 8), (0, 0)), constant_values=255))
            rows.append(np.concatenate(cells, 1))
    grid = args.base / "output" / "csa" / "demo_adapters.png"
    Image.fromarray(np.concatenate(rows, 0)).save(grid)
    print(f"demo adapters (rows: {', '.join(WORLD_DEMO_ADAPTERS)}; columns: {', '.join(PROMPTS)}; {args.seeds} seeds "
          f"each): {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
