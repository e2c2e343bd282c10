"""The pack's plots (nodes/plots.py, matplotlib Agg): sized as asked, drawn with axes and text, robust to edge cases."""
from __future__ import annotations

import pytest
import torch

import comfy_host

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def plots(comfy, comfy_base):
    return comfy_host.pack_module(comfy_base, "nodes.plots")


def ink(picture: torch.Tensor) -> float:
    """Share of pixels that are not white background."""
    return float((picture.min(-1).values < 0.9).float().mean())


def test_loss_plot_has_the_asked_size_and_survives_edge_cases(plots):
    for losses in ([], [0.5], [0.3] * 40, [1.0 / (i + 1) for i in range(300)]):
        picture = plots.loss_plot(losses, 512, 256, marks=(20,))
        assert picture.shape == (256, 512, 3) and torch.isfinite(picture).all()
        assert 0 <= float(picture.min()) and float(picture.max()) <= 1
    assert plots.loss_plot([0.5], 384, 192).shape == (192, 384, 3)


def test_loss_plot_draws_more_than_a_line(plots):
    """Axes, ticks, labels and a title put ink outside the curve: a bare curve on white would have far less."""
    curve = plots.loss_plot([1.0 / (i + 1) for i in range(100)])
    empty = plots.loss_plot([])
    assert ink(curve) > ink(empty) > 0.01, "no axes or text drawn"
    left_margin = curve[:, :40]
    assert ink(left_margin) > 0.01, "no y tick labels / axis label in the left margin"


def test_mask_grid_plot_labels_rows_and_columns(plots):
    grid = torch.zeros(2 * 16, 3 * 16)
    grid[:16, :16] = 1
    picture = plots.mask_grid_plot(grid, 16, [14.6, 3.2, 0.03], [("input", 4, 1), ("output", 3, 0)])
    assert picture.ndim == 3 and picture.shape[-1] == 3 and picture.shape[:2] == (2 * 16 + 90, 3 * 16 + 200)
    assert float(picture.max()) == 1.0 and float(picture.min()) < 0.1
    assert plots.block_label(("input", 4, 1)) == "input 4.1"
