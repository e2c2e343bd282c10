"""Plots a person reads: a title, labelled axes and ticks on every one, drawn with matplotlib.

matplotlib's object API (Figure + the Agg canvas) draws off screen without pyplot's global state or a display, so it
is safe inside ComfyUI's server process next to other packs. core/ stays free of it (core imports only torch, numpy,
einops and safetensors). No node class here.
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
MASK_MARGINS = (200, 90)  # room for the block labels and title of a mask grid (pixels)
LOSS_COLOUR, AVERAGE_COLOUR, MARK_COLOUR = "#9db4e8", "#1a3399", "#888888"


def figure(width: int, height: int) -> Figure:
    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def rendered(fig: Figure) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: the figure as drawn by Agg."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    return torch.from_numpy(pixels.copy())


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, len(values) + 1)
    starts = np.clip(ends - window, 0, None)
    return (sums[ends] - sums[starts]) / (ends - starts)


def loss_plot(losses: list[float], width: int = 512, height: int = 256, marks: tuple[int, ...] = (),
              title: str = "Training loss") -> torch.Tensor:
    """(height, width, 3): each step's loss (light), its moving average over 1/20 of the run (dark) once there are
    20 steps, dashed lines where a stage began (loss switch, resumed run). Steps count from 1."""
    fig = figure(width, height)
    ax = fig.add_subplot()
    steps = np.arange(1, len(losses) + 1)
    values = np.asarray(losses, dtype=np.float64)
    if len(values):
        ax.plot(steps, values, color=LOSS_COLOUR, linewidth=1, label="loss", marker="o" if len(values) == 1 else None)
        if len(values) >= 20:
            ax.plot(steps, moving_average(values, max(2, len(values) // 20)), color=AVERAGE_COLOUR, linewidth=1.5,
                    label="moving average")
        for step in marks:
            if 0 < step < len(values):
                ax.axvline(step + 0.5, color=MARK_COLOUR, linestyle="--", linewidth=1)
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title} ({len(values)} steps)" if len(values) else title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout(pad=0.4)
    return rendered(fig)


def block_label(block) -> str:
    """A UNet block key ('input', 4, 1) as 'input 4.1'."""
    if isinstance(block, tuple):
        name, *numbers = block
        return f"{name} {'.'.join(str(n) for n in numbers)}".strip()
    return str(block)


def mask_grid_plot(grid: torch.Tensor, cell: int, sigmas: list[float], blocks: list) -> torch.Tensor:
    """(H, W, 3): the (rows * cell, cols * cell) mask grid with a title, one row per block (labelled) and one column
    per sampling step (labelled with its noise level sigma); white = the residual acts there."""
    rows, cols = len(blocks), len(sigmas)
    width, height = cols * cell + MASK_MARGINS[0], rows * cell + MASK_MARGINS[1]  # the grid at 1:1 plus labels
    fig = figure(width, height)
    ax = fig.add_subplot()
    ax.imshow(grid.float().cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              extent=(0, cols * cell, rows * cell, 0))
    ax.set_xticks([(c + 0.5) * cell for c in range(cols)], [f"{s:.3g}" for s in sigmas], fontsize=7)
    ax.set_yticks([(r + 0.5) * cell for r in range(rows)], [block_label(b) for b in blocks], fontsize=7)
    ax.set_xlabel("sampling step (noise level σ, high to low)", fontsize=8)
    ax.set_ylabel("UNet block", fontsize=8)
    ax.set_title("Attention masks (white: residual applied)", fontsize=9)
    fig.tight_layout(pad=0.4)
    return rendered(fig)
