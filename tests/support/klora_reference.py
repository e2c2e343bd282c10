"""K-LoRA's rule written again from the paper's equations (arXiv 2502.18461, Eqs. 1-10, 12) and the official code's γ,
in float64 on dense ΔWs, without the pack's code: the tests' independent reference."""
from __future__ import annotations

import torch

TOTALS = "ratio of totals (paper Eq. 9)"  # the pack's name of the rule, as its node offers it


def reference_top_k(delta: torch.Tensor, k: int) -> float:
    """Eqs. 1-4 by sorting every |entry| (not topk)."""
    ordered = sorted(delta.double().abs().flatten().tolist(), reverse=True)
    return sum(ordered[:k])


def reference_gamma(pairs, rule: str) -> float:
    """γ from dense ΔW pairs: the official code's trimmed mean of per-layer L1 ratios, or Eq. 9's ratio of totals."""
    l1 = [(float(c.double().abs().sum()), float(s.double().abs().sum())) for c, s in pairs]
    if rule == TOTALS:
        return sum(c for c, _ in l1) / sum(s for _, s in l1)
    ratios = [c / s for c, s in l1]
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def reference_winner(dc: torch.Tensor, ds: torch.Tensor, rc: int, rs: int, gamma: float, step: int, steps: int,
                     alpha: float, beta: float, wrapped: bool) -> str:
    """Eqs. 5-10 (and 12): the layer's applied ΔW at step n of N."""
    p = step / steps
    scale = alpha * p + beta
    if wrapped:
        scale = scale - alpha * (scale // alpha)
    k = rc * rs
    return "content" if reference_top_k(dc, k) / gamma > scale * reference_top_k(ds, k) else "style"
