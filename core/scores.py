"""Content, style and prompt scores as the papers define them, and the layout of a strength-sweep grid.

Embeddings come from the encoders (nodes/scoring.py); everything here is plain tensor math:

- content score of image i = mean over the content references r of cos(DINOv2(i), DINOv2(r))
- style score of image i   = mean over the style references r of cos(CLIP(i), CLIP(r))
- prompt score of image i  = cos(CLIP image(i), CLIP text(prompt))

Several references are averaged pairwise (the DINO and CLIP-I scores of DreamBooth, which B4M and ConsisLoRA
report), not compared with their mean embedding; with one reference both agree. Scores are plain cosines in
[-1, 1] (no x100 and no CLIPScore's 2.5 · max(cos, 0)).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

METRICS = ("content", "style", "prompt")
MAX_SWEEP_VALUES = 16


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) cosines between the rows of a (N, D) and b (M, D), computed in float64."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"embeddings must be (N, D) and (M, D) with the same D; got {tuple(a.shape)} and {tuple(b.shape)}")
    norms_a, norms_b = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    if bool((norms_a == 0).any()) or bool((norms_b == 0).any()):
        raise ValueError("an embedding is all zeros, so its cosine is undefined (is the encoder initialised?)")
    return (a / norms_a) @ (b / norms_b).T


def reference_scores(embeds: torch.Tensor, reference_embeds: torch.Tensor) -> torch.Tensor:
    """(N,) mean pairwise cosine of each image against every reference."""
    return cosine_matrix(embeds, reference_embeds).mean(dim=1)


def text_scores(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """(N,) cosine of each image embedding with one text embedding (D,) or (1, D)."""
    return cosine_matrix(image_embeds, text_embed.reshape(1, -1))[:, 0]


def means(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    return {metric: float(values.mean()) for metric, values in scores.items()}


def score_table(scores: dict[str, torch.Tensor]) -> str:
    """One row per image and a mean row; columns in METRICS order (only the metrics that were scored)."""
    metrics = [m for m in METRICS if m in scores]
    if not metrics:
        return "no score"
    count = len(scores[metrics[0]])
    lines = ["image  " + "  ".join(f"{m:>8}" for m in metrics)]
    lines += [f"{i:>5}  " + "  ".join(f"{float(scores[m][i]):8.4f}" for m in metrics) for i in range(count)]
    lines.append(" mean  " + "  ".join(f"{v:8.4f}" for v in means({m: scores[m] for m in metrics}).values()))
    return "\n".join(lines)


def short_scores(values: dict[str, float]) -> str:
    """'c=0.62  s=0.71  p=0.25': a sweep cell's caption."""
    return "  ".join(f"{metric[0]}={values[metric]:.2f}" for metric in METRICS if metric in values)


def parse_values(text: str, name: str) -> list[float]:
    """Strengths written as '0, 0.5, 1' (commas or spaces); names the input when the text is not that."""
    parts = [p for p in re.split(r"[,\s;]+", text.strip()) if p]
    if not parts:
        raise ValueError(f"{name}: give at least one strength, e.g. '0, 0.5, 1'")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a list of numbers; write e.g. '0, 0.5, 1'") from None
    if len(values) > MAX_SWEEP_VALUES:
        raise ValueError(f"{name}: {len(values)} values; a sweep axis takes at most {MAX_SWEEP_VALUES}")
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise ValueError(f"{name}: {text!r} holds a value that is not finite")
    return values


def sweep_cells(x_values: list[float], y_values: list[float]) -> list[tuple[int, int, float, float]]:
    """(row, column, x, y) of every cell, row by row: rows follow y_values, columns follow x_values."""
    return [(row, col, x, y) for row, y in enumerate(y_values) for col, x in enumerate(x_values)]


def sweep_table(x_name: str, y_name: str, cells: list[tuple[int, int, float, float]],
                cell_means: list[dict[str, float]]) -> str:
    """One line per cell: its strengths and mean scores, in cell order."""
    lines = []
    for (row, col, x, y), values in zip(cells, cell_means):
        scored = "  ".join(f"{metric} {values[metric]:.4f}" for metric in METRICS if metric in values)
        lines.append(f"row {row} col {col}: {x_name} {x:g}, {y_name} {y:g}" + (f": {scored}" if scored else ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class GridLayout:
    """Where a sweep grid puts its cells, in pixels: room on the left for the row axis (ticks, tick labels, axis
    label), room on top for the title, a note and the column axis, a caption strip under each cell, a gap between
    cells; a grid narrower than ``min_width`` is centred in that width (room for the title). The picture is exactly
    ``size``; each cell image sits at ``cell_origin`` 1:1 (nodes/plots.py draws the frame around them and pastes
    them there)."""

    rows: int
    cols: int
    cell_width: int
    cell_height: int
    left: int = 84
    top: int = 108
    caption: int = 20
    gap: int = 8
    min_width: int = 400

    @property
    def grid_width(self) -> int:
        """Width of the label column and the cells (each with the gap after it)."""
        return self.left + self.cols * (self.cell_width + self.gap)

    @property
    def indent(self) -> int:
        """Extra room on both sides when the grid is narrower than min_width."""
        return max(0, self.min_width - self.grid_width) // 2

    def cell_origin(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of a cell's image."""
        return (self.indent + self.left + col * (self.cell_width + self.gap),
                self.top + row * (self.cell_height + self.caption + self.gap))

    def cell_centre(self, row: int, col: int) -> tuple[float, float]:
        """(x, y) of the centre of a cell's image: where its column and row ticks point."""
        left, top = self.cell_origin(row, col)
        return left + self.cell_width / 2, top + self.cell_height / 2

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole grid image."""
        return (self.grid_width + 2 * self.indent, self.top + self.rows * (self.cell_height + self.caption + self.gap))

    @property
    def frame(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the axes box: every cell and caption with half a gap around them."""
        half = self.gap // 2
        return (self.indent + self.left - half, self.top - half, self.indent + self.grid_width - self.gap + half,
                self.size[1] - self.gap + half)


def display_scale(height: int, width: int, min_side: int = 128) -> int:
    """Integer upscale so a small cell (64 px world images) is still readable next to its caption."""
    return max(1, -(-min_side // max(1, min(height, width))))


def cell_picture(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(H·scale, B·W·scale, 3): a cell's batch side by side, enlarged by repeating pixels (no smoothing)."""
    row = torch.cat(list(images[..., :3].float()), dim=1)
    return row.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
