"""K-LoRA's rule (core/klora.py) against a float64 reference written from the paper's equations, and on hand-built
layers whose winner is known."""
from __future__ import annotations

import pytest
import torch

from core.adapter import LowRank
from core.klora import (LINEAR, TOTALS, TRIMMED, WRAPPED, balance, content_wins, layer_scores, schedule, step_progress,
                        style_scale, top_k_sum)
from support.klora_reference import reference_gamma, reference_winner


def lowrank(out: int, inner: int, rank: int, seed: int, size: float = 1.0, alpha: float | None = None) -> LowRank:
    generator = torch.Generator().manual_seed(seed)
    return LowRank(up=torch.randn(out, rank, generator=generator) * size, down=torch.randn(rank, inner, generator=generator),
                   alpha=alpha)


def test_top_k_sum_is_the_sum_of_the_k_largest_magnitudes():
    delta = torch.tensor([[3.0, -7.0, 1.0], [0.5, -2.0, 6.0]])
    assert top_k_sum(delta, 2) == 13.0 and top_k_sum(delta, 3) == 16.0
    assert top_k_sum(delta, 100) == pytest.approx(19.5)  # k beyond the size takes every entry


def test_scale_patterns_as_equations_7_and_12():
    assert style_scale(0.0, 1.5, 0.5, LINEAR) == 0.5 and style_scale(0.5, 1.5, 0.5, LINEAR) == 1.25
    assert style_scale(0.1, 1.5, 1.275, WRAPPED) == pytest.approx(1.425)
    assert style_scale(0.2, 1.5, 1.275, WRAPPED) == pytest.approx(0.075)  # 1.575 wraps past α
    assert [step_progress(n, 4) for n in range(4)] == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="step must be in 0..3"):
        step_progress(4, 4)


def test_hand_built_layers_have_the_known_winner():
    """Content's ΔW has top-K mass 10, style's 4 (K = 1): content wins until S · 4 reaches 10 / γ."""
    content = LowRank(up=torch.tensor([[10.0], [0.0]]), down=torch.tensor([[1.0, 0.0]]))
    style = LowRank(up=torch.tensor([[0.0], [4.0]]), down=torch.tensor([[0.0, 1.0]]))
    scores = layer_scores(content, style)
    assert (scores.content, scores.style, scores.k) == (10.0, 4.0, 1)
    assert content_wins(scores, 1.0, 2.0) and not content_wins(scores, 1.0, 2.5)  # 10 > 8; a tie (10 = 10) is style's
    assert not content_wins(scores, 2.0, 1.5)  # γ halves content's side: 5 < 6


def test_alpha_and_rank_scale_the_scores_like_the_applied_change():
    plain, scaled = lowrank(6, 5, 2, seed=1), lowrank(6, 5, 2, seed=1, alpha=1.0)  # scale 1 vs alpha / rank = 0.5
    assert layer_scores(scaled, None).content == pytest.approx(layer_scores(plain, None).content * 0.5)


@pytest.mark.parametrize("rule", [TRIMMED, TOTALS])
@pytest.mark.parametrize("pattern,beta", [(WRAPPED, 1.275), (LINEAR, 0.5)])
def test_every_layer_and_step_matches_the_float64_reference(rule, pattern, beta):
    sizes = [0.3, 1.0, 3.0, 0.05, 12.0]  # one layer far larger, so the trimmed mean drops its ratio
    content = {f"layer{i}": lowrank(8, 6, 2, seed=i, size=s) for i, s in enumerate(sizes)}
    style = {f"layer{i}": lowrank(8, 6, 3, seed=100 + i) for i in range(len(sizes))}
    plan = schedule(content, style, alpha=1.5, beta=beta, pattern=pattern, rule=rule)
    pairs = [(content[k].delta(torch.float64), style[k].delta(torch.float64)) for k in sorted(content)]
    gamma = reference_gamma(pairs, rule)
    assert plan.gamma == pytest.approx(gamma, rel=1e-12)
    steps, seen = 20, set()
    for key in content:
        for step in range(steps):
            expected = reference_winner(content[key].delta(torch.float64), style[key].delta(torch.float64), 2, 3, gamma,
                                        step, steps, 1.5, beta, pattern == WRAPPED)
            assert plan.winner(key, step_progress(step, steps)) == expected, (key, step)
            seen.add(expected)
    assert seen == {"content", "style"}, "the cases exercise both outcomes"


def test_trimmed_mean_drops_ratios_at_three_times_the_mean():
    scores = {k: layer_scores(LowRank(up=torch.tensor([[c]]), down=torch.ones(1, 1)),
                              LowRank(up=torch.tensor([[1.0]]), down=torch.ones(1, 1)))
              for k, c in {"a": 1.0, "b": 1.0, "c": 1.0, "d": 13.0}.items()}
    assert balance(scores, TRIMMED) == 1.0  # mean 4: the 13 is at or above 12 and dropped
    assert balance(scores, TOTALS) == 4.0


def test_one_side_alone_always_wins_its_layers():
    content = {"a": lowrank(4, 4, 2, seed=3)}
    zero = {"a": LowRank(up=torch.zeros(4, 2), down=torch.zeros(2, 4))}
    for step in range(8):
        progress = step_progress(step, 8)
        assert schedule(content, {}).winner("a", progress) == "content"
        assert schedule(content, zero).winner("a", progress) == "content"
        assert schedule({}, content).winner("a", progress) == "style"
        assert schedule(zero, content).winner("a", progress) == "style"
    assert schedule(content, zero).gamma == 1.0, "a zero change enters no ratio"


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="pattern must be one of"):
        style_scale(0.1, 1.5, 0.5, "S**")
    with pytest.raises(ValueError, match="balance must be one of"):
        balance({}, "median")
    with pytest.raises(ValueError, match="S\\* needs alpha > 0"):
        schedule({"a": lowrank(2, 2, 1, seed=0)}, {}, alpha=0.0)


def test_the_projections_of_a_fused_weight_are_its_smallest_key_map_slices():
    from core.klora import finest_projections

    assert finest_projections({(0, 3072), (0, 9216), (3072, 3072), (6144, 3072), (9216, 12288)}) == [
        (0, 3072), (3072, 3072), (6144, 3072), (9216, 12288)]  # FLUX linear1: a to_qkv name covers q, k and v
    assert finest_projections({(0, 4), (2, 4)}) == []  # overlapping slices: the weight is switched whole
