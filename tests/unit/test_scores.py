"""core.scores: cosines and their aggregation against plain numpy, value lists, grid order and layout."""
import numpy as np
import pytest
import torch

from core.scores import (GridLayout, cell_picture, cosine_matrix, display_scale, means, parse_values,
                         reference_scores, score_table, short_scores, sweep_cells, sweep_table, text_scores)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def numpy_cosine(u, v):
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return float(u @ v / np.sqrt((u @ u) * (v @ v)))


def test_reference_scores_are_mean_pairwise_cosines_computed_by_hand():
    images, refs = rand(3, 7, seed=1), rand(4, 7, seed=2)
    got = reference_scores(images, refs)
    expected = [np.mean([numpy_cosine(images[i], refs[j]) for j in range(4)]) for i in range(3)]
    assert got.shape == (3,)
    assert np.allclose(got.numpy(), expected, atol=1e-12)


def test_reference_scores_differ_from_cosine_with_the_mean_reference():
    images, refs = rand(2, 5, seed=3), rand(3, 5, seed=4)
    with_mean = cosine_matrix(images, refs.mean(dim=0, keepdim=True))[:, 0]
    assert not torch.allclose(reference_scores(images, refs), with_mean, atol=1e-3)


def test_text_scores_take_a_vector_or_a_row_and_an_image_against_itself_scores_one():
    images, text = rand(3, 6, seed=5), rand(6, seed=6)
    expected = [numpy_cosine(images[i], text) for i in range(3)]
    assert np.allclose(text_scores(images, text).numpy(), expected, atol=1e-12)
    assert torch.equal(text_scores(images, text[None]), text_scores(images, text))
    assert torch.allclose(reference_scores(images, images[1:2] * 3.0)[1], torch.tensor(1.0, dtype=torch.float64),
                          atol=1e-12)


def test_scores_are_scale_free_and_in_float64():
    a, b = rand(2, 4, seed=7).half(), rand(3, 4, seed=8)
    got = cosine_matrix(a, b)
    assert got.dtype == torch.float64
    assert torch.allclose(got, cosine_matrix(a.double() * 5, b.double() * 0.1), atol=1e-12)


def test_bad_embeddings_are_refused():
    with pytest.raises(ValueError, match="same D"):
        cosine_matrix(rand(2, 4), rand(2, 5))
    with pytest.raises(ValueError, match="all zeros"):
        reference_scores(torch.zeros(1, 4), rand(2, 4))


def test_table_lists_every_image_and_the_mean_in_metric_order():
    scores = {"style": torch.tensor([0.5, 0.25]), "content": torch.tensor([1.0, 0.0])}
    lines = score_table(scores).splitlines()
    assert lines[0].split() == ["image", "content", "style"]
    assert lines[1].split() == ["0", "1.0000", "0.5000"]
    assert lines[-1].split() == ["mean", "0.5000", "0.3750"]
    assert means(scores) == {"style": 0.375, "content": 0.5}
    assert short_scores({"prompt": 0.254, "content": 0.5}) == "c=0.50  p=0.25"
    assert score_table({}) == "no score"


def test_values_parse_and_errors_name_the_input():
    assert parse_values(" 0, 0.5 1;2 ", "x_values") == [0.0, 0.5, 1.0, 2.0]
    with pytest.raises(ValueError, match="^x_values: give at least one"):
        parse_values(" , ", "x_values")
    with pytest.raises(ValueError, match="^y_values: 'a, 1' is not a list of numbers"):
        parse_values("a, 1", "y_values")
    with pytest.raises(ValueError, match="^y_values: 17 values"):
        parse_values(",".join(["1"] * 17), "y_values")
    with pytest.raises(ValueError, match="^x_values: .* not finite"):
        parse_values("1, nan", "x_values")


def test_cells_run_row_by_row_rows_following_y_and_the_table_keeps_that_order():
    cells = sweep_cells([0.0, 1.0, 2.0], [10.0, 20.0])
    assert cells == [(0, 0, 0.0, 10.0), (0, 1, 1.0, 10.0), (0, 2, 2.0, 10.0),
                     (1, 0, 0.0, 20.0), (1, 1, 1.0, 20.0), (1, 2, 2.0, 20.0)]
    table = sweep_table("a", "b", cells[:2], [{"style": 0.5}, {}]).splitlines()
    assert table == ["row 0 col 0: a 0, b 10: style 0.5000", "row 0 col 1: a 1, b 10"]


def test_grid_layout_places_cells_without_overlap_inside_the_image():
    layout = GridLayout(rows=2, cols=3, cell_width=40, cell_height=30)
    width, height = layout.size
    boxes = [(*layout.cell_origin(r, c), 40, 30 + layout.caption) for r in range(2) for c in range(3)]
    for i, (x, y, w, h) in enumerate(boxes):
        assert x >= layout.left and y >= layout.top and x + w <= width and y + h <= height
        for (x2, y2, w2, h2) in boxes[i + 1:]:
            assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y


def test_cell_picture_puts_the_batch_side_by_side_and_repeats_pixels():
    images = rand(2, 3, 4, 4, seed=9)
    picture = cell_picture(images, 2)
    assert picture.shape == (6, 16, 3)
    assert torch.equal(picture[::2, ::2], torch.cat([images[0, ..., :3], images[1, ..., :3]], dim=1))
    assert torch.equal(picture[1::2, 1::2], picture[::2, ::2])
    assert display_scale(64, 64) == 2 and display_scale(512, 300) == 1 and display_scale(50, 100) == 3


def test_grid_layout_frames_the_cells_and_centres_a_narrow_grid():
    wide = GridLayout(rows=2, cols=3, cell_width=140, cell_height=30)
    assert wide.size[0] == wide.left + 3 * (140 + wide.gap) >= wide.min_width and wide.indent == 0
    narrow = GridLayout(rows=1, cols=1, cell_width=40, cell_height=30)
    assert narrow.size[0] in (narrow.min_width, narrow.min_width - 1)
    assert narrow.cell_origin(0, 0)[0] == narrow.indent + narrow.left and narrow.indent > 0
    for layout in (wide, narrow):
        left, top, right, bottom = layout.frame
        width, height = layout.size
        assert 0 < left and 0 < top and right < width and bottom < height
        for row in range(layout.rows):
            for col in range(layout.cols):
                x, y = layout.cell_origin(row, col)
                assert left < x and x + layout.cell_width < right and top < y
                assert y + layout.cell_height + layout.caption < bottom
                assert layout.cell_centre(row, col) == (x + layout.cell_width / 2, y + layout.cell_height / 2)
