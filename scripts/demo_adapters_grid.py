"""Draw the trained world demo adapters side by side through a real server: base / content / style / composed.

    .venv/bin/python scripts/demo_adapters_grid.py [--seeds 2]

One row per method (LoRA, ConsisLoRA, QR-LoRA, B4M, Personalized Residual with LAG off and on), four cells of seeds
each:

- base: the world model alone, 'a zkz sks' (it knows neither word);
- content: the content adapter (the held-out shape star, 'sks'), 'a checkered sks';
- style: the style adapter (the held-out style zigzag, 'zkz'), 'a zkz circle';
- composed: both, 'a zkz sks': LoRA applied together, ConsisLoRA's content block + style block (Compose Content
  and Style), QR-LoRA through QR Merge, B4M the committed made adapter (B4M Make of its two runs with the joint
  fine-tune), the Personalized Residual through Apply Localized Residual (concept words 'sks diamond', the prompts
  'a checkered sks diamond' and 'a zkz sks diamond': it was trained on 'a <style> sks diamond') on the model with the
  LoRA style demo.

Writes the grid to the server's output folder and prints its path.
"""
from __future__ import annotations


import numpy as np
from PIL import Image

from comfy_host import ComfyServer
from model_names import WORLD_DEMO_ADAPTERS, WORLD_DEMO_B4M_MADE, WORLD_DEMO_RESIDUAL, WORLD_DEMO_RESIDUAL_WORDS
from world_grid import caption_graph, grid_arguments, pictures_side_by_side

PROMPTS = {"base": "a zkz sks", "content": "a checkered sks", "style": "a zkz circle", "composed": "a zkz sks"}
RESIDUAL_ROWS = {"residual, LAG off": False, "residual, LAG on": True}
RESIDUAL_PROMPTS = {cell: prompt.replace("sks", WORLD_DEMO_RESIDUAL_WORDS) for cell, prompt in PROMPTS.items()}
ROWS = [*WORLD_DEMO_ADAPTERS, *RESIDUAL_ROWS]


def load(node_id: str, name: str) -> dict:
    return {node_id: {"class_type": "CSA_LoadAdapter", "inputs": {"adapter_name": name, "strength": 1.0,
                                                                  "part": "whole file", "role": "from file"}}}


def apply(node_id: str, model: list, adapter: list) -> dict:
    return {node_id: {"class_type": "CSA_ApplyAdapters", "inputs": {"model": model, "adapter": adapter,
                                                                    "block_strengths": ""}}}


def model_for(row: str, cell: str) -> tuple[dict, list, list | None]:
    """Graph nodes that make the cell's MODEL, the MODEL output to sample with and the positive conditioning (None:
    the caption's own)."""
    if cell == "base":
        return {}, ["1", 0], None
    if row in RESIDUAL_ROWS:
        return residual_nodes(RESIDUAL_ROWS[row], cell)
    content, style = WORLD_DEMO_ADAPTERS[row]
    if cell in ("content", "style"):
        return {**load("20", content if cell == "content" else style), **apply("21", ["1", 0], ["20", 0])}, \
            ["21", 0], None
    nodes = {**load("20", content), **load("22", style)}
    if row == "consislora":
        nodes["21"] = {"class_type": "CSA_ComposeContentAndStyle", "inputs": {
            "model": ["1", 0], "content_image_adapter": ["20", 0], "style_image_adapter": ["22", 0]}}
    elif row == "qr":
        nodes["21"] = {"class_type": "CSA_QRMerge", "inputs": {
            "model": ["1", 0], "content": ["20", 0], "style": ["22", 0], "lambda_content": 1.0, "lambda_style": 1.0,
            "interference": "off"}}
    elif row == "b4m":  # Make's joint fine-tune takes minutes: the committed made file (workflows/train_b4m runs Make)
        nodes = {**load("20", WORLD_DEMO_B4M_MADE), **apply("21", ["1", 0], ["20", 0])}
    else:
        nodes["21"] = {"class_type": "CSA_ApplyAdapters", "inputs": {
            "model": ["1", 0], "adapter": ["20", 0], "adapter_2": ["22", 0], "block_strengths": ""}}
    return nodes, ["21", 0], None


def residual_nodes(lag: bool, cell: str) -> tuple[dict, list, list | None]:
    """The residual star (Apply Localized Residual, concept words 'sks diamond') on the base model (content) or on the
    model with the LoRA style demo (composed); the style cell is the LoRA style demo alone."""
    style = WORLD_DEMO_ADAPTERS["lora"][1]
    nodes = {**load("22", style), **apply("24", ["1", 0], ["22", 0])}
    if cell == "style":
        return nodes, ["24", 0], None
    nodes.update(load("20", WORLD_DEMO_RESIDUAL))
    nodes["21"] = {"class_type": "CSA_ApplyLocalizedResidual", "inputs": {
        "model": ["24", 0] if cell == "composed" else ["1", 0], "residual": ["20", 0], "clip": ["1", 1],
        "prompt": RESIDUAL_PROMPTS[cell], "concept_words": WORLD_DEMO_RESIDUAL_WORDS, "lag": lag,
        "threshold_mode": "median", "threshold": 0.5, "start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}}
    return nodes, ["21", 0], ["21", 1]


def cell_graph(row: str, cell: str, seeds: int, steps: int) -> dict:
    nodes, model, positive = model_for(row, cell)
    prefix = f"csa/demo/{row.replace(', ', '_').replace(' ', '_')}_{cell}"
    prompt = RESIDUAL_PROMPTS[cell] if row in RESIDUAL_ROWS and cell != "style" else PROMPTS[cell]
    return caption_graph(prompt, 1000, seeds, prefix, steps, model, nodes, positive)


def labelled(rows: list[np.ndarray], names: list[str], columns: list[str], left: int = 110, top: int = 14) -> Image.Image:
    """The rows of cells (one picture strip per cell, 8 px apart), each named, under a header of column names."""
    from PIL import ImageDraw

    height, width = rows[0].shape[0], rows[0].shape[1]
    canvas = Image.new("RGB", (left + width, top + height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, name in enumerate(columns):
        draw.text((left + index * width // len(columns) + 2, 1), name, fill="black")
    for index, (name, pixels) in enumerate(zip(names, rows)):
        canvas.paste(Image.fromarray(pixels), (left, top + index * height))
        draw.text((4, top + index * height + height // 2 - 6), name, fill="black")
    return canvas


def main() -> int:
    args = grid_arguments(__doc__.splitlines()[0], 2, "one seed, two steps")
    rows = []
    with ComfyServer(args.base) as server:
        for row in ROWS:
            cells = []
            for cell in PROMPTS:
                pictures = pictures_side_by_side(server.run_prompt(cell_graph(row, cell, args.seeds, args.steps)))
                cells.append(np.pad(pictures, ((0, 0), (0, 8), (0, 0)), constant_values=255))
            rows.append(np.concatenate(cells, 1))
    grid = args.base / "output" / "csa" / "demo_adapters.png"
    labelled(rows, ROWS, [f"{cell}: '{prompt}'" for cell, prompt in PROMPTS.items()]).save(grid)
    print(f"demo adapters (rows: {', '.join(ROWS)}; columns: {', '.join(PROMPTS)}; {args.seeds} seeds "
          f"each): {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
