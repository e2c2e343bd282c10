"""The method benchmark's bookkeeping (bench/world/method_benchmark.py): spreads, verdicts against the naive sum, the
table's rows, the measures that need no model, and the run-time estimate the docstring states."""
import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

WORLD = Path(__file__).resolve().parents[2] / "bench" / "world"
sys.path[:0] = [str(WORLD), str(WORLD.parent)]

import method_benchmark as mb  # noqa: E402
from world import render  # noqa: E402

from core.adapter import Adapter, LowRank  # noqa: E402


def test_rates_are_averaged_per_training_and_sampling_seed():
    entries = [(0, [True, False]), (0, [True, True]), (1, [False, False]), (1, [True, False])]
    rate = mb.image_rate(entries, [0, 1])
    cells = [1.0, 0.5, 0.5, 0.0]  # seed 0: columns (T,T), (F,T); seed 1: (F,T), (F,F)
    assert rate["mean"] == pytest.approx(np.mean(cells)) and rate["spread"] == pytest.approx(np.std(cells))


def result(both: float, spread: float = 0.05) -> dict:
    return {"both": {"mean": both, "spread": spread}}


def test_verdicts_say_plainly_where_the_naive_sum_was_not_beaten():
    naive = result(0.5)
    assert mb.verdict(naive, naive) == "the baseline"
    assert mb.verdict(result(0.7), naive).startswith("beats it by 20 points")
    assert "not a clear win" in mb.verdict(result(0.53), naive)
    assert mb.verdict(result(0.3), naive) == "did NOT beat the naive sum (-20 points)"
    assert mb.verdict(result(0.5), naive) == "did NOT beat the naive sum (tie)"
    assert mb.verdict(result(0.9), None) == "no naive row in this run"


def measured(name: str) -> dict:
    rate = {"mean": 0.5, "spread": 0.1}
    return {"row": name, "chosen": {"content": 1.0}, "grid": [{}, {}], "sampling_seconds_per_image": 1.5,
            **{k: rate for k in ("both", "content", "style", "both_strict", "recontext", "recontext_style", "leakage", "scene",
                                 "diversity", "background", "cpu", "parameters")}}


def test_every_row_gets_a_table_line_and_not_yet_rows_give_their_reason():
    results = [measured(row.name) if not row.not_yet else {"row": row.name, "not_yet": row.not_yet}
               for row in mb.ROWS]
    lines = mb.table_rows(results)
    assert len(lines) == len(mb.ROWS) and all(len(line) == len(mb.COLUMNS) for line in lines)
    for row, line in zip(mb.ROWS, lines):
        assert line[0].startswith(row.name)
        if row.not_yet:
            assert line[-1] == row.not_yet
    assert "best of 2" in lines[0][0] and lines[0][-1] == "the baseline"
    names = [row.name for row in mb.ROWS]
    assert {"B4M make", mb.NAIVE} <= set(names) and len(set(names)) == len(names)
    assert all(row.not_yet or (row.trainers[0] in mb.TRAINERS and row.trainers[1] in mb.TRAINERS) for row in mb.ROWS)


def test_change_outside_the_object_is_zero_on_a_clean_world_picture():
    clean = np.stack([render("star", "striped", seed).image for seed in range(3)])
    assert mb.background_change(clean) < 1e-3  # white stripes near the edge may count as outside: tiny
    hazy = clean.astype(np.int16)
    hazy[:, :4] -= 20  # a darker band along the top, far from the object
    assert mb.background_change(np.clip(hazy, 0, 255).astype(np.uint8)) > 0.005


def test_qr_lora_counts_only_the_upper_triangle_of_delta_r():
    qr = Adapter(modules={"m": LowRank(up=torch.zeros(5, 2), down=torch.zeros(2, 4))}, method="qr-lora")
    assert mb.trainable_count(qr) == 4 + 3
    lora = qr.replace(method="lora")
    assert mb.trainable_count(lora) == 5 * 2 + 2 * 4


ADDED_SINCE = ("K-LoRA (training-free)", "ZipLoRA (merger vectors trained)",  # rows the measured runs had not
               "B4M make + joint fine-tune")


def test_the_estimate_matches_the_measured_runs_and_the_stated_budget():
    rows_then = [row for row in mb.ROWS if row.name not in ADDED_SINCE]
    partial = argparse.Namespace(pairs=mb.PAIRS[:1], seeds=1, steps=150, prompts=5, scene_prompts=0, sampling_seeds=4,
                                 sample_steps=20, leakage_shapes=0, style_alone_only=False)  # no scene prompts yet
    rows = [r for r in mb.ROWS if r.name in (mb.NAIVE, "ConsisLoRA + Content-Style Guider", "QR-LoRA (trained ΔR) merged")]
    assert mb.estimate_seconds(rows, partial) == pytest.approx(809, rel=0.1)  # the partial run of 2026-11-23
    first = argparse.Namespace(pairs=mb.PAIRS, seeds=3, steps=250, prompts=1, scene_prompts=1, sampling_seeds=4,
                               sample_steps=20, leakage_shapes=0, style_alone_only=False)  # no style-alone leakage yet
    workers = mb.shard_cells(mb.all_cells(mb.PAIRS, range(3)), 2)
    alone = mb.shard_cells(mb.style_cells(mb.PAIRS, range(3)), 2)
    # the first full run, 2026-12-01: 12,603 CPU s in two workers
    assert sum(mb.estimate_seconds(rows_then, first, *cells) for cells in zip(workers, alone)) == \
        pytest.approx(12603, rel=0.03)
    defaults = argparse.Namespace(**{**vars(first), "leakage_shapes": len(mb.LEAKAGE_SHAPES)})
    # five ways of applying a style adapter alone (LoRA, B-LoRA and ConsisLoRA style blocks, QR-LoRA, B4M run) x
    # 6 (style, seed) cells x 6 shapes x 4 pictures
    assert mb.estimate_seconds(rows_then, defaults) - mb.estimate_seconds(rows_then, first) == \
        pytest.approx(5 * 6 * 6 * 4 * mb.PICTURE_SECONDS)
    assert 3.2 * 3600 < mb.estimate_seconds(rows_then, defaults) < 3.7 * 3600  # the docstring's 3.5 CPU hours
    # K-LoRA (2 grid points), ZipLoRA (100 merge steps a cell) and B4M's fine-tune (100 steps at B4M's rate) add
    # pictures (grid points + recontextualisation + leakage + scene) and merge steps to every cell; B4M's fine-tune
    # row applies its style run alone as B4M Make does (no new style-alone pictures)
    added = mb.estimate_seconds(mb.ROWS, defaults) - mb.estimate_seconds(rows_then, defaults)
    cells = len(mb.PAIRS) * 3
    merges = 100 * mb.ZIPLORA_STEP_SECONDS + 100 * mb.STEP_SECONDS["b4m"]
    assert added == pytest.approx(cells * (merges + ((2 + 2 + 1) + 2 * (1 + 2 + 1)) * 4 * mb.PICTURE_SECONDS))
    only = argparse.Namespace(**{**vars(defaults), "style_alone_only": True})
    styles = 6 * 250 * sum(mb.STEP_SECONDS[t] for t in ("lora", "b-lora", "consislora", "qr", "b4m"))
    assert mb.estimate_seconds(rows_then, only) == pytest.approx(styles + 5 * 6 * 6 * 4 * mb.PICTURE_SECONDS
                                                               + mb.JUDGE_SECONDS)


def test_style_alone_leakage_is_one_entry_per_cell_and_shape_and_shared_by_rows_applying_the_same_adapter():
    sampled = []

    def alone(ctx, style, variant):
        def sample(prompt):
            sampled.append(prompt)
            return prompt.split()[-1]
        return ("whole adapter", variant.get("style", 1.0)), sample

    class Judge:
        @staticmethod
        def labels(shape):  # two pictures: the first keeps the prompted shape, the second does not
            return [shape, "star"], []

    ctx = argparse.Namespace(args=argparse.Namespace(leakage_shapes=3), judge=Judge(), alone={},
                             adapter=lambda *key: key)
    naive, residual = (mb.Row(name, trainer, style_alone=alone, style_trainer="lora")
                       for name, trainer in (("n", "lora"), ("r", "residual")))
    cells = mb.style_cells(mb.PAIRS, [0, 1])
    assert cells == [("zigzag", 0), ("speckled", 0), ("zigzag", 1), ("speckled", 1)]
    entries = mb.measure_style_alone(ctx, naive, {"style": 1.0}, cells)
    assert len(entries["kept"]) == 4 * 3 and entries["kept"][0] == (0, [True, False]) and entries["leak"] == []
    assert sampled[:3] == [f"a {mb.STYLE_WORD} {shape}" for shape in mb.LEAKAGE_SHAPES[:3]]
    assert mb.measure_style_alone(ctx, residual, {"lag": True}, cells) == entries and len(sampled) == 12  # shared
    mb.measure_style_alone(ctx, naive, {"style": 0.75}, cells)  # another strength: its own pictures
    assert len(sampled) == 24 and mb.image_rate(entries["kept"], [0, 1]) == {"mean": 0.5, "spread": 0.5}
    # an entangled style reference (zigzag on a circle): never prompted with its own shape; the leak is that shape
    Judge.labels = staticmethod(lambda shape: ([shape, mb.ENTANGLED_STYLE_SHAPE], []))
    entangled = mb.measure_style_alone(ctx, naive, {"style": 1.0}, [(f"zigzag:{mb.ENTANGLED_STYLE_SHAPE}:1", 0)])
    assert sampled[24:] == [f"a {mb.STYLE_WORD} {shape}" for shape in mb.LEAKAGE_SHAPES[1:4]]
    assert entangled == {"kept": [(0, [True, False])] * 3, "leak": [(0, [False, True])] * 3}


def test_workers_get_contiguous_near_equal_runs_of_cells_and_train_few_adapters_twice():
    cells = mb.all_cells(mb.PAIRS, range(3))
    shards = mb.shard_cells(cells, 2)
    assert [c for shard in shards for c in shard] == cells and [len(s) for s in shards] == [6, 6]
    adapters = [{(role, pair[i], seed) for pair, seed in shard for i, role in enumerate(("content", "style"))}
                for shard in shards]
    assert [len(a) for a in adapters] == [7, 7]  # one process trains 12 per trainer; the split seed trains 2 twice
    assert [len(s) for s in mb.shard_cells(cells[:5], 3)] == [2, 1, 2] and mb.shard_cells(cells[:1], 1) == [cells[:1]]


def figures(row, cells, rng) -> dict:
    """What measure_row returns for ``cells``: random per-image hits (2 pictures), per-cell measures, pictures."""
    hits = lambda: [bool(v) for v in rng.integers(0, 2, 2)]  # noqa: E731
    return {"row": row.name, "best": 0, "grid_scores": [(0.5, 0.5)] * len(row.grid),
            "per_image": {k: [(seed, hits()) for _, seed in cells] for k in ("both", "content", "recontext")},
            "per_cell": {k: [(seed, float(rng.random())) for _, seed in cells] for k in ("diversity", "background")},
            "seconds": 2.0 * len(cells), "pictures": 2 * len(cells),
            "sheet": {(*pair, seed): rng.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8) for pair, seed in cells}}


def test_merged_workers_give_the_figures_of_one_process():
    row, seeds = mb.ROWS[0], [0, 1, 2]
    cells = mb.all_cells(mb.PAIRS, seeds)
    rng = np.random.default_rng(0)
    whole = figures(row, cells, rng)
    parts = []
    for shard in mb.shard_cells(cells, 2):
        index = [cells.index(c) for c in shard]
        parts.append({**whole, "per_image": {k: [v[i] for i in index] for k, v in whole["per_image"].items()},
                      "per_cell": {k: [v[i] for i in index] for k, v in whole["per_cell"].items()},
                      "seconds": 2.0 * len(shard), "pictures": 2 * len(shard),
                      "sheet": {(*p, s): whole["sheet"][(*p, s)] for p, s in shard}})
    trained = {("lora", role, target, seed): (10.0 * seed + len(target), 100 + seed)
               for seed in seeds for role, targets in (("content", ("star", "heart")), ("style", ("zigzag", "speckled")))
               for target in targets}
    one, merged = mb.summarise(row, [whole], trained, seeds, mb.PAIRS), mb.summarise(row, parts, trained, seeds, mb.PAIRS)
    for key in ("both", "content", "recontext", "diversity", "background", "cpu", "parameters"):
        assert merged[key] == pytest.approx(one[key]), key
    assert merged["sampling_seconds_per_image"] == one["sampling_seconds_per_image"] == 1.0
    assert merged["sheet"].keys() == one["sheet"].keys() and len(merged["sheet"]) == len(cells)
    # per training seed: its two content and two style adapters (star 4, heart 5, zigzag 6, speckled 8) per pair
    assert merged["cpu"]["mean"] == pytest.approx(np.mean([(40 * s + 4 + 5 + 6 + 8) / 2 for s in seeds]))
    assert merged["parameters"]["mean"] == pytest.approx(2 * 101)
    parts[1]["best"] = 1
    with pytest.raises(AssertionError, match="different grid points"):
        mb.summarise(row, parts, trained, seeds, mb.PAIRS)


def test_workers_swap_grid_hits_and_each_gets_every_workers_in_order(tmp_path):
    import threading

    contexts = [mb.Context(None, None, None, None, None, None, [], shard=k, shards=2, exchange_dir=tmp_path)
                for k in range(2)]
    local = [[{"both": [True, k == 0], "content": [k == 1]}] for k in range(2)]
    got = [None, None]
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, contexts[k].exchange("row0", local[k])))
               for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    expected = [{"both": [True, True, True, False], "content": [False, True]}]
    assert got == [expected, expected]
    assert mb.Context(None, None, None, None, None, None, []).exchange("row0", local[0]) == local[0]  # one worker


def test_entangled_references_name_one_context_and_a_picture_count():
    pairs = mb.entangled_pairs(mb.PAIRS[:2], mb.parse_cases("base:6, held-out:1"))
    assert pairs == [("star:checkered:6", "zigzag:circle:6"), ("star:speckled:1", "zigzag:circle:1"),
                     ("star:checkered:6", "speckled:circle:6"), ("star:zigzag:1", "speckled:circle:1")]
    assert [mb.held_out(t) for t in pairs[1]] == ["star", "zigzag"] and mb.reference_context(pairs[1][0]) == "speckled"
    assert mb.held_out("star") == "star" and mb.reference_context("star") is None  # the disentangled targets
    assert mb.case_of("star:speckled:1") == "speckled x1" and mb.case_of("star") == ""
    assert mb.recontext_styles(argparse.Namespace(prompts=2), "red") == ("checkered", "striped")
    assert mb.leakage_shapes(2, "circle") == ("triangle", "square") and mb.leakage_shapes(1, None) == ("circle",)
    for bad in ("base", "base:0", "photo:3", "held-out:x"):
        with pytest.raises(SystemExit, match="--cases"):
            mb.parse_cases(bad)


def test_entangled_rows_show_leaks_and_the_headline_per_case():
    rate = {"mean": 0.25, "spread": 0.1}
    entangled = {**measured(mb.NAIVE), **{k: rate for k in ("content_leak", "content_leak_composed", "style_leak_alone",
                                                              "style_leak_composed", "leakage_alone")},
                 "both@checkered x6": {"mean": 0.5, "spread": 0.0}, "both@checkered x1": {"mean": 0.0, "spread": 0.0},
                 "compose_cpu": {"mean": 30.0, "spread": 0.0}}
    line = mb.table_rows([entangled], entangled=True)[0]
    assert len(line) == len(mb.ENTANGLED_COLUMNS)
    assert line[mb.ENTANGLED_COLUMNS.index("both right per case")] == "checkered x6: 50%, checkered x1: 0%"
    assert line[mb.ENTANGLED_COLUMNS.index("content leak in the composition")] == "25% ± 10"
    assert line[mb.ENTANGLED_COLUMNS.index("training CPU s")] == "0 ± 0 + 30 merge"
    assert mb.table_rows([measured(mb.NAIVE)])[0][mb.COLUMNS.index("training CPU s")] == "0 ± 0"  # no merge: no term
