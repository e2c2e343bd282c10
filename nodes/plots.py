"""Plots a person reads: a title, labelled axes and ticks on every one, drawn with matplotlib: loss curves, mask
grids, the score table and the strength-sweep grid.

matplotlib's object API (Figure + the Agg canvas) draws off screen without pyplot's global state or a display, so it
is safe inside ComfyUI's server process next to other packs. core/ stays free of it (core imports only torch, numpy,
einops and safetensors). No node class here.

The sweep grid keeps every cell image pixel-exact: the figure is exactly the size of core.scores.GridLayout, its axes
use pixel coordinates (x right, y down) over the layout's frame, matplotlib draws the frame, ticks at each cell's
centre, axis labels, title and the caption under each cell, and the cells (8-bit rounded, no resampling) are pasted
into the rendered pixels at ``GridLayout.cell_origin`` afterwards.
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
MASK_MARGINS = (200, 90)  # room for the block labels and title of a mask grid (pixels)
LOSS_COLOUR, AVERAGE_COLOUR, MARK_COLOUR = "#9db4e8", "#1a3399", "#888888"
HEADER_COLOUR, RULE_COLOUR, NOTE_COLOUR = "#e8e8e8", "#999999", "#444444"


def figure(width: int, height: int) -> Figure:
    """A figure of width x height pixels on its own Agg canvas."""
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def rendered_pixels(fig: Figure) -> np.ndarray:
    """(H, W, 3) uint8: the figure as drawn by Agg."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def as_image(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 as float in [0, 1]."""
    return torch.from_numpy(pixels.astype(np.float32) / 255.0)


def rendered(fig: Figure) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: the figure as drawn by Agg."""
    return as_image(rendered_pixels(fig))


def eight_bit(image: torch.Tensor) -> np.ndarray:
    """An image (H, W, C) in [0, 1] as (H, W, 3) uint8, rounded (as ComfyUI's SaveImage rounds)."""
    return (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def wrap_text(text, room: float) -> int:
    """Break a text artist's lines between words so each spans at most ``room`` pixels; returns the line count."""
    renderer = text.figure.canvas.get_renderer()  # a top-level Figure (no subfigures)
    lines = []
    for paragraph in text.get_text().splitlines():
        line = ""
        for word in paragraph.split(" "):
            text.set_text(f"{line} {word}".strip())
            if line and text.get_window_extent(renderer).width > room:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
    text.set_text("\n".join(lines))
    return len(lines)


def fit_font(text, size: float, room: float, smallest: float = 5.0) -> None:
    """Shrink a text artist's font (from ``size`` points) until it spans at most ``room`` pixels along its direction
    (its width, or its height when rotated 90°), not below ``smallest``."""
    renderer = text.figure.canvas.get_renderer()  # a top-level Figure (no subfigures)
    text.set_fontsize(size)
    while size > smallest:
        box = text.get_window_extent(renderer)
        if (box.height if text.get_rotation() % 180 == 90 else box.width) <= room:
            return
        size -= 0.5
        text.set_fontsize(size)


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


def score_table_plot(header: list[str], rows: list[list[str]], title: str, note: str = "") -> torch.Tensor:
    """(H, W, 3): a titled table, a header row on grey, the last row (the mean) in bold, entries centred;
    ``note`` (lines under the title, wrapped to the width) says what the columns are."""
    widths = [max(64, 8 * max(len(row[c]) for row in [header, *rows]) + 24) for c in range(len(header))]
    row_height, side = 24, 12
    width = max(sum(widths) + 2 * side, 360)
    note_height = 0
    if note:  # measured on a scratch figure: the table's height depends on the note's line count
        probe = figure(width, 100).text(0, 0, note, fontsize=8, linespacing=1.3)
        note_height = 13 * wrap_text(probe, width - 16) + 6
    top = 40 + note_height
    height = top + row_height * (len(rows) + 1) + side
    fig = figure(width, height)
    left = (width - sum(widths)) / 2
    ax = fig.add_axes((left / width, side / height, sum(widths) / width, (height - top - side) / height))
    ax.set_axis_off()
    table = ax.table(cellText=rows, colLabels=header, colWidths=[w / sum(widths) for w in widths],
                     cellLoc="center", colLoc="center", bbox=(0, 0, 1, 1), edges="horizontal")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (row, col), cell in table.get_celld().items():
        cell.set_edgecolor(RULE_COLOUR)
        cell.PAD = 0.12
        if row == 0:
            cell.set_facecolor(HEADER_COLOUR)
            cell.get_text().set_fontweight("bold")
        elif row == len(rows):
            cell.get_text().set_fontweight("bold")
    fit_font(fig.text(0.5, 1 - 8 / height, title, ha="center", va="top"), 11, width - 8)
    if note:
        text = fig.text(0.5, 1 - 32 / height, note, ha="center", va="top", color=NOTE_COLOUR, fontsize=8,
                        linespacing=1.3)
        wrap_text(text, width - 16)
    return rendered(fig)


def sweep_grid_plot(cells: list[torch.Tensor], layout, x_label: str, x_values: list[float], y_label: str,
                    y_values: list[float], captions: list[str], title: str, note: str = "") -> torch.Tensor:
    """(H, W, 3) of exactly ``layout.size`` (a core.scores.GridLayout): the cells in a frame whose top axis ticks
    each column at its x value and whose left axis ticks each row at its y value, both axes labelled, a title and
    ``note`` above, each cell's caption (its scores) in the strip under it. ``cells`` are (cell_height, cell_width, 3)
    in row-major cell order (core.scores.sweep_cells); each lands 8-bit rounded and unscaled at
    ``layout.cell_origin``."""
    width, height = layout.size
    fig = figure(width, height)
    x0, y0, x1, y1 = layout.frame
    ax = fig.add_axes((x0 / width, 1 - y1 / height, (x1 - x0) / width, (y1 - y0) / height))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # pixel rows: y grows downwards, as in the picture
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set_xticks([layout.cell_centre(0, col)[0] for col in range(layout.cols)], [f"{x:g}" for x in x_values],
                  fontsize=8)
    ax.set_yticks([layout.cell_centre(row, 0)[1] for row in range(layout.rows)], [f"{y:g}" for y in y_values],
                  fontsize=8)
    ax.tick_params(length=4, pad=2)
    fit_font(ax.set_xlabel(x_label, labelpad=3), 9, x1 - x0)
    fit_font(ax.set_ylabel(y_label, labelpad=3), 9, y1 - y0)
    fit_font(fig.text(0.5, 1 - 6 / height, title, ha="center", va="top"), 11, width - 8)
    if note:  # two lines fit between the title and the column axis
        text = fig.text(0.5, 1 - 28 / height, note, ha="center", va="top", color=NOTE_COLOUR, fontsize=8,
                        linespacing=1.3)
        while wrap_text(text, width - 8) > 2 and text.get_fontsize() > 5:
            text.set_text(note)
            text.set_fontsize(text.get_fontsize() - 0.5)
    for index, caption in enumerate(captions):
        if caption:
            left, top = layout.cell_origin(index // layout.cols, index % layout.cols)
            fit_font(ax.text(left + layout.cell_width / 2, top + layout.cell_height + layout.caption / 2, caption,
                             ha="center", va="center"), 8, layout.cell_width)
    pixels = rendered_pixels(fig)
    if pixels.shape[:2] != (height, width):
        raise RuntimeError(f"the sweep grid rendered at {pixels.shape[1]} x {pixels.shape[0]}, not {width} x {height}")
    for index, cell in enumerate(cells):
        left, top = layout.cell_origin(index // layout.cols, index % layout.cols)
        pixels[top:top + layout.cell_height, left:left + layout.cell_width] = eight_bit(cell)
    return as_image(pixels)
