"""K-LoRA (Ouyang, Li, Hou, CVPR 2025, arXiv 2502.18461): per layer and denoising step, apply the content LoRA or the
style LoRA, whichever carries more of its weight in its K largest entries once the style side is scaled by the step.

Per layer l, with ΔW_c and ΔW_s the two LoRAs' changes at strength 1 (alpha / rank scale included; the official code
has none) and K = r_c · r_s (paper Eq. 5; a count, capped at the layer's size):

    T_c = Σ TopK(|ΔW_c|),  T_s = Σ TopK(|ΔW_s|)                         (Eqs. 1-4)
    S(p) = α · p + β,  S*(p) = (α · p + β) mod α                         (Eqs. 7, 12; p = step / steps in [0, 1))
    content wins  ⇔  T_c / γ > S(p) · T_s                               (Eqs. 6, 8, 10; a tie goes to style, as
                                                                          in the official code)

and the winner's whole ΔW is applied, the other dropped (not elementwise). γ balances the two LoRAs' overall sizes:
the official code takes the mean of the per-layer ratios ‖ΔW_c‖₁ / ‖ΔW_s‖₁ after dropping ratios at or above 3x
their mean ("trimmed"); the paper's Eq. 9 is the ratio of the summed L1 norms ("totals"). Layers where only one LoRA
has a change, or one change is zero, enter no ratio; with no ratio left γ = 1.

Official defaults: α = 1.5; pattern S* with β = 1.275 (the code's 1.5 x 0.85; the paper writes 1.3), or S with
β = 0.5. The official code counts p in layer calls against a hard-coded total (28000 = 560 layers x 50 steps for
SDXL); here p comes from the sampler's own step, so any step count and schedule works.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank

LINEAR, WRAPPED = "S (linear)", "S* (wrapped, official default)"
PATTERNS = (WRAPPED, LINEAR)
DEFAULT_ALPHA = 1.5
DEFAULT_BETA = {WRAPPED: 1.275, LINEAR: 0.5}
TRIMMED, TOTALS = "trimmed mean of layer ratios (official code)", "ratio of totals (paper Eq. 9)"
BALANCES = (TRIMMED, TOTALS)
TRIM_FACTOR = 3.0  # the official code drops per-layer ratios at or above 3x their mean


@dataclass(frozen=True)
class LayerScores:
    """One layer's top-K sums (T_c, T_s: 0 where that LoRA has no change) and L1 norms, K = r_c · r_s."""

    content: float
    style: float
    content_l1: float
    style_l1: float
    k: int


def top_k_sum(delta: torch.Tensor, k: int) -> float:
    """Σ of the k largest |entries| of ΔW (all of them when k exceeds its size), in float64."""
    values = delta.detach().abs().flatten().to(torch.float64)
    return float(values.topk(min(k, values.numel())).values.sum())


def layer_scores(content: LowRank | None, style: LowRank | None) -> LayerScores:
    """T_c, T_s and the L1 norms of one layer; a missing side scores 0 (K is then the present side's rank squared)."""
    ranks = [f.rank for f in (content, style) if f is not None]
    if not ranks:
        raise ValueError("a K-LoRA layer needs a content or a style change")
    k = ranks[0] * ranks[-1]
    deltas = [None if f is None else f.delta(torch.float64) for f in (content, style)]
    sums = [0.0 if d is None else top_k_sum(d, k) for d in deltas]
    norms = [0.0 if d is None else float(d.abs().sum()) for d in deltas]
    return LayerScores(sums[0], sums[1], norms[0], norms[1], k)


def balance(scores: dict[str, LayerScores], rule: str = TRIMMED) -> float:
    """γ over the layers where both LoRAs change something (see the module docstring)."""
    if rule not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {rule!r}")
    both = [s for s in scores.values() if s.content_l1 > 0 and s.style_l1 > 0]
    if not both:
        return 1.0
    if rule == TOTALS:
        return sum(s.content_l1 for s in both) / sum(s.style_l1 for s in both)
    ratios = [s.content_l1 / s.style_l1 for s in both]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < TRIM_FACTOR * mean]
    return sum(kept) / len(kept)  # never empty: the smallest ratio is below the mean or equals it, which is < 3x


def style_scale(progress: float, alpha: float, beta: float, pattern: str) -> float:
    """S(p) = α p + β, or S*(p) = (α p + β) mod α (Python's modulo: in [0, α) for α > 0)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    scale = alpha * progress + beta
    return scale % alpha if pattern == WRAPPED else scale


def content_wins(scores: LayerScores, gamma: float, scale: float) -> bool:
    """T_c / γ > S · T_s, strictly (a tie, and a layer neither LoRA changes, go to style)."""
    return scores.content / gamma > scale * scores.style


def step_progress(step: int, steps: int) -> float:
    """p = n / N for step n = 0 .. N-1 of N (the official code's layer-call count, without its within-step offset)."""
    if steps <= 0 or not 0 <= step < steps:
        raise ValueError(f"step must be in 0..{steps - 1}, got {step} of {steps}")
    return step / steps


@dataclass(frozen=True)
class Schedule:
    """The K-LoRA rule for a set of layers: which LoRA each applies at progress p."""

    scores: dict[str, LayerScores]
    gamma: float
    alpha: float
    beta: float
    pattern: str

    def content_layers(self, progress: float) -> set[str]:
        scale = style_scale(progress, self.alpha, self.beta, self.pattern)
        return {key for key, s in self.scores.items() if content_wins(s, self.gamma, scale)}

    def winner(self, key: str, progress: float) -> str:
        scale = style_scale(progress, self.alpha, self.beta, self.pattern)
        return "content" if content_wins(self.scores[key], self.gamma, scale) else "style"


def schedule(content: dict[str, LowRank], style: dict[str, LowRank], alpha: float = DEFAULT_ALPHA,
             beta: float = DEFAULT_BETA[WRAPPED], pattern: str = WRAPPED, rule: str = TRIMMED) -> Schedule:
    """The Schedule for every layer either LoRA changes ({layer key: factors at strength 1} per side)."""
    if alpha <= 0 and pattern == WRAPPED:
        raise ValueError(f"the wrapped pattern S* needs alpha > 0 (it is taken modulo alpha), got {alpha}")
    scores = {key: layer_scores(content.get(key), style.get(key)) for key in sorted({*content, *style})}
    return Schedule(scores, balance(scores, rule), alpha, beta, pattern)


def winners_summary(plan: Schedule, steps: int) -> list[str]:
    """How many layers apply the content LoRA at each of ``steps`` evenly spaced steps, and the scale there."""
    lines = []
    for step in range(steps):
        progress = step_progress(step, steps)
        scale = style_scale(progress, plan.alpha, plan.beta, plan.pattern)
        lines.append(f"step {step + 1}/{steps} (p {progress:.2f}, S {scale:.3f}): content in "
                     f"{len(plan.content_layers(progress))} of {len(plan.scores)} layers")
    return lines


def finest_projections(rows: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """The smallest projections of a weight's key-map slices (a slice covering others, such as a to_qkv name over
    q, k and v, is their union, not a projection of its own); [] when the rest still overlap."""
    finest = sorted(r for r in rows if not any(o != r and r[0] <= o[0] and o[0] + o[1] <= r[0] + r[1] for o in rows))
    overlapping = any(a[0] + a[1] > b[0] for a, b in zip(finest, finest[1:]))
    return [] if overlapping else finest
