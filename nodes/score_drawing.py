"""Pictures of scores: a readable table and the strength-sweep grid, drawn with PIL's default font.

Layout (where cells go) is core.scores.GridLayout; this module only paints. No node class here.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..core.scores import GridLayout

INK, PAPER, RULE = (20, 20, 20), (255, 255, 255), (200, 200, 200)
LINE_HEIGHT = 16


def to_image_batch(picture: Image.Image) -> torch.Tensor:
    """A PIL picture as a ComfyUI IMAGE (1, H, W, 3) in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def from_image(image: torch.Tensor) -> Image.Image:
    """One ComfyUI image (H, W, C) as a PIL picture (alpha dropped)."""
    pixels = (image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")


def table_image(header: list[str], rows: list[list[str]]) -> torch.Tensor:
    """A table with a header row and a rule under it; columns as wide as their widest entry."""
    font = ImageFont.load_default()
    widths = [max(int(font.getlength(row[c])) for row in [header, *rows]) + 18 for c in range(len(header))]
    picture = Image.new("RGB", (sum(widths) + 12, LINE_HEIGHT * (len(rows) + 1) + 16), PAPER)
    draw = ImageDraw.Draw(picture)
    for index, row in enumerate([header, *rows]):
        y = 6 + index * LINE_HEIGHT + (4 if index else 0)
        x = 6
        for text, width in zip(row, widths):
            draw.text((x + width - 12 - font.getlength(text), y), text, fill=INK, font=font)
            x += width
    draw.line([(6, LINE_HEIGHT + 7), (picture.width - 6, LINE_HEIGHT + 7)], fill=RULE)
    return to_image_batch(picture)


def sweep_grid(cell_pictures: list[torch.Tensor], layout: GridLayout, x_name: str, x_values: list[float],
               y_name: str, y_values: list[float], captions: list[str]) -> torch.Tensor:
    """The grid: column labels (x values) on top, row labels (y values) on the left, each cell's caption under it.

    ``cell_pictures`` are (cell_height, cell_width, 3) in row-major cell order (core.scores.sweep_cells)."""
    font = ImageFont.load_default()
    picture = Image.new("RGB", layout.size, PAPER)
    draw = ImageDraw.Draw(picture)
    draw.text((4, 4), f"columns: {x_name}", fill=INK, font=font)
    draw.text((4, 4 + LINE_HEIGHT), f"rows: {y_name}", fill=INK, font=font)
    for col, x in enumerate(x_values):
        left, _ = layout.cell_origin(0, col)
        label = f"{x:g}"
        draw.text((left + (layout.cell_width - font.getlength(label)) / 2, layout.top - LINE_HEIGHT - 2), label,
                  fill=INK, font=font)
    for row, y in enumerate(y_values):
        _, top = layout.cell_origin(row, 0)
        draw.text((4, top + layout.cell_height / 2 - LINE_HEIGHT / 2), f"{y:g}", fill=INK, font=font)
    for index, (cell, caption) in enumerate(zip(cell_pictures, captions)):
        left, top = layout.cell_origin(index // layout.cols, index % layout.cols)
        picture.paste(from_image(cell), (left, top))
        draw.text((left + 2, top + layout.cell_height + 2), caption, fill=INK, font=font)
    return to_image_batch(picture)
