"""The strength-sweep workflow through a real server on the world model: the grid's layout, cells equal to single
runs of the stock nodes, scores in the report and in the Score node's table."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import comfy_host
from core.scores import GridLayout, display_scale, parse_values, sweep_cells

pytestmark = pytest.mark.e2e

WORKFLOW = comfy_host.REPO_ROOT / "workflows" / "api" / "strength_sweep.json"
OUTPUT_NODES = {"SaveImage", "PreviewAny"}


def pixels(path) -> np.ndarray:
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.int16)


def node_of(graph: dict, class_type: str) -> str:
    found = [node_id for node_id, node in graph.items() if node["class_type"] == class_type]
    assert len(found) == 1, f"{WORKFLOW.name} should have one {class_type}"
    return found[0]


def saver_of(graph: dict, source: str, output: int) -> str:
    return next(node_id for node_id, node in graph.items()
                if node["class_type"] == "SaveImage" and node["inputs"]["images"] == [source, output])


def single_run(graph: dict, sweep: str, lambda_content: float, lambda_style: float, prefix: str) -> dict:
    """The workflow's loaders and prompts, then QR Merge -> KSampler -> VAEDecode -> SaveImage with one cell's λ."""
    s = graph[sweep]["inputs"]
    single = {k: v for k, v in graph.items() if k != sweep and v["class_type"] not in OUTPUT_NODES}
    single["100"] = {"class_type": "CSA_QRMerge", "inputs": {
        "model": s["model"], "content": s["content"], "style": s["style"], "lambda_content": lambda_content,
        "lambda_style": lambda_style, "interference": s["interference"]}}
    single["101"] = {"class_type": "KSampler", "inputs": {
        "model": ["100", 0], "seed": s["seed"], "steps": s["steps"], "cfg": s["cfg"], "sampler_name": s["sampler_name"],
        "scheduler": s["scheduler"], "positive": s["positive"], "negative": s["negative"],
        "latent_image": s["latent_image"], "denoise": 1.0}}
    single["102"] = {"class_type": "VAEDecode", "inputs": {"samples": ["101", 0], "vae": s["vae"]}}
    single["103"] = {"class_type": "SaveImage", "inputs": {"images": ["102", 0], "filename_prefix": prefix}}
    return single


def test_sweep_workflow_cells_equal_single_runs_and_carry_the_scores(comfy_server):
    graph = comfy_host.load_api_workflow(WORKFLOW)
    for node in graph.values():
        if node["class_type"] == "SaveImage":  # a prefix of its own: saved again even when the graph is cached
            node["inputs"]["filename_prefix"] += "_e2e"
    sweep = node_of(graph, "CSA_StrengthSweep")
    assert graph[sweep]["inputs"]["mode"] == "QR Merge lambdas"
    xs, ys = (parse_values(graph[sweep]["inputs"][k], k) for k in ("x_values", "y_values"))
    result = comfy_server.run_prompt(graph)

    cells = result.images_by_node[saver_of(graph, sweep, 1)]
    assert len(cells) == len(xs) * len(ys)
    cell_pixels = [pixels(p) for p in cells]
    height, width = cell_pixels[0].shape[:2]
    scale = display_scale(height, width)
    layout = GridLayout(rows=len(ys), cols=len(xs), cell_width=width * scale, cell_height=height * scale)
    [grid_path] = result.images_by_node[saver_of(graph, sweep, 0)]
    grid = pixels(grid_path)
    assert grid.shape[:2] == (layout.size[1], layout.size[0])
    for index, (row, col, _, _) in enumerate(sweep_cells(xs, ys)):
        left, top = layout.cell_origin(row, col)
        drawn = grid[top:top + layout.cell_height:scale, left:left + layout.cell_width:scale]
        assert np.abs(drawn - cell_pixels[index]).max() <= 1, f"grid cell {index} is not the cell image"  # round/trunc

    for index, (row, col, x, y) in enumerate(sweep_cells(xs, ys)):
        if row == col:
            continue  # off-diagonal cells tell rows from columns
        single = comfy_server.run_prompt(single_run(graph, sweep, x, y, f"csa/e2e_sweep_single_{row}_{col}"))
        assert np.array_equal(pixels(single.output_images[0]), cell_pixels[index]), f"cell {index} (λ {x}, {y})"

    report = next(t for t in result.output_texts if t.startswith("row 0 col 0"))
    lines = report.splitlines()
    assert len(lines) == len(cells)
    values = [[float(v) for v in re.findall(r"(?:style|prompt) (-?\d\.\d{4})", line)] for line in lines]
    assert all(len(v) == 2 and all(-1 <= s <= 1 for s in v) for v in values), report
    table = next(t for t in result.output_texts if t.startswith("image"))
    per_image = [[float(v) for v in line.split()[1:]] for line in table.splitlines()[1:len(cells) + 1]]
    assert per_image == values, "the sweep's scores differ from Score Content / Style / Prompt on the same images"
    assert result.images_by_node[saver_of(graph, node_of(graph, "CSA_ScoreContentStylePrompt"), 7)]
