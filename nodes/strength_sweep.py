"""Strength Sweep: one seed, a grid over two strengths, the scores printed under every cell.

How a cell's two strengths (x: columns, y: rows) act:

- "adapter strengths": the content adapter at strength x and the style adapter at strength y (each times the
  strength set on its loader), each its own ComfyUI weight patch: the same as two Apply Adapters nodes in a row.
- "QR Merge lambdas": QR Merge's W0 + Q (λc ΔRc + λs ΔRs) with λ_content = x, λ_style = y and its interference
  option; both at 0 is the model itself (as QR Merge).
- Strength Sweep (Content-Style Guider): the guider's λ_content = x and λ_style = y, sampled as
  SamplerCustomAdvanced samples (RandomNoise seed, KSamplerSelect, BasicScheduler at denoise 1).

Every cell starts from the same noise (the seed), so cells differ only by their strengths; a cell equals a single
run of the corresponding nodes with that seed.
"""
from __future__ import annotations

import copy

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter
from ..core.merge import INTERFERENCE_MODES, merge_layers
from ..core.scores import (GridLayout, cell_picture, display_scale, means, parse_values, short_scores, sweep_cells,
                           sweep_table)
from . import comfy_compat as cc
from .common import PackNode, cfg_conditioning_inputs, schema
from .model_binding import apply_patch_groups, merge_input, merged_adapter, patches_by_strength, weighted_terms
from .plots import sweep_grid_plot
from .scoring import build_scorer, score_inputs
from .sockets import AdapterSocket

MODES = {"adapter strengths": ("content strength", "style strength"),
         "QR Merge lambdas": ("lambda_content", "lambda_style")}
GUIDER_AXES = ("lambda_content", "lambda_style")
AXIS_LABELS = {"content strength": "content adapter strength", "style strength": "style adapter strength",
               "lambda_content": "λ_content", "lambda_style": "λ_style"}
TITLES = {"adapter strengths": "adapter strengths", "QR Merge lambdas": "QR Merge λ", "guider": "Content-Style Guider λ"}
SCORE_KEY = {"content": "c = content", "style": "s = style", "prompt": "p = prompt"}


def sampling_inputs() -> list:
    return [
        io.Vae.Input("vae", tooltip="Decodes every cell."),
        io.Latent.Input("latent_image", tooltip="The latent every cell starts from (e.g. Empty Latent Image); a batch "
                                                "shows several images side by side in each cell."),
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="One seed for every cell, so the cells differ only by their strengths."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per cell."),
        io.Combo.Input("sampler_name", options=cc.sampler_names(), tooltip="The sampler of every cell."),
        io.Combo.Input("scheduler", options=cc.scheduler_names(), tooltip="The scheduler of every cell."),
        io.String.Input("x_values", default="0, 0.5, 1",
                        tooltip="Strengths along the columns (left to right), comma separated; at most 16."),
        io.String.Input("y_values", default="0, 0.5, 1",
                        tooltip="Strengths along the rows (top to bottom), comma separated; at most 16."),
    ]


def sweep_outputs() -> list:
    return [
        io.Image.Output(display_name="grid", tooltip="A titled figure: the cells at display size with the two "
                                                     "strengths as labelled axes (a tick at each value) and each "
                                                     "cell's mean scores under it (c = content, s = style, "
                                                     "p = prompt)."),
        io.Image.Output(display_name="images", tooltip="Every cell's images at full size, row by row (the cell order "
                                                       "of the grid), each cell's batch together."),
        io.String.Output(display_name="report", tooltip="One line per cell: its strengths and mean scores."),
    ]


def run_grid(axes: tuple[str, str], x_values: list[float], y_values: list[float], steps: int, sample_cell, vae,
             scorer, title: str) -> io.NodeOutput:
    """Sample, decode and score every cell in order; one progress bar over all steps; stops on cancel."""
    cells = sweep_cells(x_values, y_values)
    bar = cc.progress_bar(len(cells) * steps)
    batches, cell_means = [], []
    for index, (_, _, x, y) in enumerate(cells):
        cc.throw_if_interrupted()
        samples = sample_cell(x, y, step_callback(bar, index * steps))
        batches.append(cc.decode_images(vae, samples))
        cell_means.append(means(scorer.score(batches[-1])) if scorer is not None else {})
        bar.update_absolute((index + 1) * steps)
    scale = display_scale(batches[0].shape[1], batches[0].shape[2])
    pictures = [cell_picture(batch, scale) for batch in batches]
    layout = GridLayout(rows=len(y_values), cols=len(x_values), cell_width=pictures[0].shape[1],
                        cell_height=pictures[0].shape[0])
    scored = [metric for metric in SCORE_KEY if metric in cell_means[0]]
    note = ("under each cell its mean scores (cosines in [-1, 1]):\n" + ", ".join(SCORE_KEY[m] for m in scored)
            if scored else "no scores: connect the score inputs to print them under each cell")
    grid = sweep_grid_plot(pictures, layout, AXIS_LABELS[axes[0]], x_values, AXIS_LABELS[axes[1]], y_values,
                           [short_scores(m) for m in cell_means], title, note)[None]
    return io.NodeOutput(grid, torch.cat(batches), sweep_table(axes[0], axes[1], cells, cell_means))


def step_callback(bar, offset: int):
    """A sampler callback(step, x0, x, total_steps): advance the sweep's bar; stop between steps on cancel."""
    def callback(step, x0, x, total_steps):
        cc.throw_if_interrupted()
        bar.update_absolute(offset + step + 1)
    return callback


def optional_scorer(references: dict):
    """A Scorer when any score input is connected (prompt counts when not empty), else None."""
    if all(v is None for k, v in references.items() if k != "prompt") and not references.get("prompt", "").strip():
        return None
    return build_scorer(**references)


def adapter_cell_model(model, content: Adapter, style: Adapter):
    """model(x, y): both adapters at strengths x and y, each as its own patch (two Apply Adapters in a row)."""
    def cell_model(x: float, y: float):
        patched = model
        for adapter, factor in ((content, x), (style, y)):
            groups, _ = patches_by_strength([adapter.replace(strength=factor * adapter.strength)], patched, None, {})
            patched = apply_patch_groups(patched, None, groups)[0]
        return patched
    return cell_model


def qr_merge_cell_model(model, content: Adapter, style: Adapter, interference: str):
    """model(λc, λs): QR Merge's merged adapter patched in (the adapters are bound to the model once; every kind QR
    Merge takes, as it takes it)."""
    inputs = [merge_input(content, model, "content"), merge_input(style, model, "style")]

    def cell_model(lambda_content: float, lambda_style: float):
        if lambda_content == 0 and lambda_style == 0:
            return model
        terms, vectors = weighted_terms(inputs, {"content": lambda_content, "style": lambda_style})
        merged = merged_adapter(merge_layers(terms, interference), vectors, "Strength Sweep")
        return apply_patch_groups(model, None, patches_by_strength([merged], model, None, {})[0])[0]
    return cell_model


class StrengthSweep(PackNode):
    """Sample a grid over two strengths with one seed: the content and style adapters' strengths, or QR Merge's
    λ_content and λ_style. Prints each cell's content / style / prompt scores under it (connect the references and
    encoders), so the trade-off is visible at a glance."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "StrengthSweep", "Strength Sweep", inputs=[
                io.Model.Input("model", tooltip="The base model (without the two adapters)."),
                *cfg_conditioning_inputs("The prompt of every cell.", "The negative prompt of every cell."),
                AdapterSocket.Input("content", tooltip="The content adapter: its strength (or λ_content) runs along "
                                                       "the columns."),
                AdapterSocket.Input("style", tooltip="The style adapter: its strength (or λ_style) runs along the rows."),
                io.Combo.Input("mode", options=list(MODES), default="adapter strengths",
                               tooltip="adapter strengths: each adapter patched at x / y times its loader strength; "
                                       "QR Merge lambdas: QR Merge with λ_content = x, λ_style = y."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, tooltip="CFG scale of every cell."),
                *sampling_inputs(),
                io.Combo.Input("interference", options=list(INTERFERENCE_MODES), default="off",
                               tooltip="QR Merge lambdas only: QR Merge's interference removal."),
                *score_inputs(),
            ],
            outputs=sweep_outputs(),
        )

    @classmethod
    def execute(cls, model, positive, negative, content: Adapter, style: Adapter, mode: str, cfg: float, vae,
                latent_image, seed: int, steps: int, sampler_name: str, scheduler: str, x_values: str, y_values: str,
                interference: str = "off", **references) -> io.NodeOutput:
        xs, ys = parse_values(x_values, "x_values"), parse_values(y_values, "y_values")
        scorer = optional_scorer(references)
        cell_model = (qr_merge_cell_model(model, content, style, interference) if mode == "QR Merge lambdas"
                      else adapter_cell_model(model, content, style))

        def sample_cell(x, y, callback):
            return cc.sample_like_ksampler(cell_model(x, y), seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                   latent_image, callback)
        return run_grid(MODES[mode], xs, ys, steps, sample_cell, vae, scorer,
                        f"Strength Sweep: {TITLES[mode]}, seed {seed}")


class GuiderStrengthSweep(PackNode):
    """Sample a grid over the Content-Style Guider's λ_content (columns) and λ_style (rows) with one seed, as
    SamplerCustomAdvanced would; prints each cell's scores under it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "GuiderStrengthSweep", "Strength Sweep (Content-Style Guider)", inputs=[
                io.Guider.Input("guider", tooltip="A Content-Style Guider with all four adapters connected (its own λ "
                                                  "values are replaced by the grid's)."),
                *sampling_inputs(),
                *score_inputs(),
            ],
            outputs=sweep_outputs(),
        )

    @classmethod
    def execute(cls, guider, vae, latent_image, seed: int, steps: int, sampler_name: str, scheduler: str,
                x_values: str, y_values: str, **references) -> io.NodeOutput:
        xs, ys = parse_values(x_values, "x_values"), parse_values(y_values, "y_values")
        check_guider(guider)
        scorer = optional_scorer(references)

        def sample_cell(x, y, callback):
            return cc.sample_like_sampler_custom_advanced(with_lambdas(guider, x, y), seed, steps, sampler_name, scheduler, latent_image,
                                 callback)
        return run_grid(GUIDER_AXES, xs, ys, steps, sample_cell, vae, scorer,
                        f"Strength Sweep: {TITLES['guider']}, seed {seed}")


# -- the Content-Style Guider's λ (nodes/consistency_guidance.py keeps them in guider.lambdas) -----------------------

def check_guider(guider) -> None:
    lambdas = getattr(guider, "lambdas", None)
    if not isinstance(lambdas, dict) or set(lambdas) != {"content", "style"}:
        raise ValueError(f"guider: a {type(guider).__name__} has no λ_content / λ_style; connect a Content-Style Guider "
                         f"(CSA_ContentStyleGuider)")


def with_lambdas(guider, lambda_content: float, lambda_style: float):
    cell = copy.copy(guider)
    cell.lambdas = {"content": lambda_content, "style": lambda_style}
    return cell
