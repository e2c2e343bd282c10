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


def test_sweep_grid_plot_frames_pixel_exact_cells_with_labelled_axes(plots):
    """The cells land unchanged at the layout's origins; axes, ticks, labels, title and captions put ink around them."""
    from core.scores import GridLayout

    xs, ys = [0.0, 0.5, 1.0], [0.25, 2.0]
    cells = [torch.rand(40, 56, 3, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    layout = GridLayout(rows=2, cols=3, cell_width=56, cell_height=40)
    captions = ["c=0.61  s=0.71"] * 5 + [""]
    picture = plots.sweep_grid_plot(cells, layout, "λ_content", xs, "λ_style", ys, captions, "Strength Sweep", "a note")
    width, height = layout.size
    assert picture.shape == (height, width, 3)
    for index, cell in enumerate(cells):
        left, top = layout.cell_origin(index // 3, index % 3)
        drawn = picture[top:top + 40, left:left + 56]
        assert torch.equal(drawn, (cell * 255).round() / 255), f"cell {index} is not pasted unchanged"
        strip = picture[top + 40:top + 40 + layout.caption, left:left + 56]
        assert (ink(strip) > 0.02) == bool(captions[index]), f"caption {index}"
    frame_left, frame_top, _, _ = layout.frame
    assert ink(picture[:frame_top - 2]) > 0.01, "no title / column axis above the cells"
    assert ink(picture[frame_top:, :frame_left - 2]) > 0.01, "no row axis left of the cells"


def test_score_table_plot_is_a_titled_table(plots):
    rows = [["0", "0.6123", "-0.0100"], ["mean", "0.6123", "-0.0100"]]
    picture = plots.score_table_plot(["image", "content", "style"], rows, "Scores of 1 image", "content: a\nstyle: b")
    assert picture.ndim == 3 and picture.shape[-1] == 3 and picture.shape[0] > 24 * 3 and picture.shape[1] >= 320
    assert 0.02 < ink(picture) < 0.5 and float(picture.min()) < 0.2
    taller = plots.score_table_plot(["image", "content", "style"], [rows[0]] * 9 + rows[1:], "Scores of 9 images")
    assert taller.shape[0] > picture.shape[0] and taller.shape[1] == picture.shape[1]
