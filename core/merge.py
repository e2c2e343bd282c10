"""Merging content and style adapters on a shared orthonormal basis (QR-LoRA's merge, generalised).

Per layer, with weights w_i = λ_role · strength_i and deltas ΔW_i = s_i up_i down_i:

- shared Q (QR-LoRA adapters of one base, up_i = Q up to column signs):
      ΔW = Q (Σ w_i s_i ΔR_i)                                   rank r
- otherwise (ordinary LoRAs): one orthonormal basis for all up-spaces, [up_1 … up_n] = Q R_u, and
      ΔW = Q Σ w_i s_i R_u[:, cols_i] down_i                     rank ≤ Σ r_i
  which is exactly Σ w_i ΔW_i, stored as one LoRA (up = Q, down = the summed coefficients).

Interference option: remove from the style coefficients their part in the content delta's input
(row) space, or the reverse, or both. The row space is where QR-LoRA's ΔR lives, so the option also
acts on shared-Q merges. Overlap report: principal-angle cosines between the content and the style
column spaces (outputs) and row spaces (inputs) of each layer: 1 identical, 0 orthogonal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank

INTERFERENCE_MODES = ("off", "style without content directions", "content without style directions", "both")
MERGE_ROLES = ("content", "style")


@dataclass(frozen=True)
class Term:
    factors: LowRank
    weight: float
    role: str  # content or style


@dataclass(frozen=True)
class Overlap:
    column_cosines: torch.Tensor | None  # principal-angle cosines of the output spaces, descending
    row_cosines: torch.Tensor | None  # of the input spaces


@dataclass(frozen=True)
class MergedLayer:
    factors: LowRank
    path: str  # "shared-q" or "joint-basis"
    overlap: Overlap


def orthonormal_basis(matrix: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """Orthonormal columns spanning the column space of ``matrix`` (rank-revealing, via SVD)."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return u[:, :0]
    return u[:, s > tolerance * s[0]]


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of a and b (descending).

    Fast path for full-rank tall factors: with Gram matrices AᵀA = LaLaᵀ and BᵀB = LbLbᵀ, the cosines
    are the singular values of La⁻¹ AᵀB Lb⁻ᵀ, all small r x r work. Rank-deficient inputs take the SVD path.
    """
    small = _cosines_from_grams(a, b)
    if small is not None:
        return small
    qa, qb = orthonormal_basis(a), orthonormal_basis(b)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        return torch.zeros(0, dtype=a.dtype)
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def _cosines_from_grams(a: torch.Tensor, b: torch.Tensor, min_ratio: float = 1e-4) -> torch.Tensor | None:
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    la, info_a = torch.linalg.cholesky_ex(a64.T @ a64)
    lb, info_b = torch.linalg.cholesky_ex(b64.T @ b64)
    if info_a or info_b:
        return None
    for factor in (la, lb):
        diagonal = torch.diagonal(factor)
        if diagonal.min() <= min_ratio * diagonal.max():
            return None
    m = torch.linalg.solve_triangular(la, a64.T @ b64, upper=False)
    m = torch.linalg.solve_triangular(lb, m.T, upper=False).T
    return torch.linalg.svdvals(m).clamp(0.0, 1.0).to(a.dtype)


def shared_q_signs(terms: list[Term], tolerance: float) -> list[torch.Tensor] | None:
    """Per term, the column signs that make its up equal the first term's up; None when the ups differ."""
    first = terms[0].factors.up.flatten(1)
    signs = []
    for term in terms:
        up = term.factors.up.flatten(1)
        if up.shape != first.shape:
            return None
        s = torch.sign((up * first).sum(0))
        s = torch.where(s == 0, torch.ones_like(s), s)
        if not torch.allclose(up * s, first, atol=tolerance, rtol=0):
            return None
        signs.append(s)
    return signs


def role_coefficients(terms, coefficients) -> dict[str, torch.Tensor | None]:
    sums = {}
    for role in MERGE_ROLES:
        parts = [c for t, c in zip(terms, coefficients) if t.role == role]
        sums[role] = torch.stack(parts).sum(0) if parts else None
    return sums


def remove_directions(coefficients: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    """Coefficients minus their part in the row space of ``other``."""
    if other is None:
        return coefficients
    basis = orthonormal_basis(other.T)  # (in, k) spanning other's rows
    return coefficients - (coefficients @ basis) @ basis.T


def apply_interference(sums: dict, mode: str) -> torch.Tensor:
    if mode not in INTERFERENCE_MODES:
        raise ValueError(f"interference must be one of {INTERFERENCE_MODES}, got {mode!r}")
    content, style = sums["content"], sums["style"]
    if mode in ("style without content directions", "both") and style is not None:
        style = remove_directions(style, sums["content"])
    if mode in ("content without style directions", "both") and content is not None:
        content = remove_directions(content, sums["style"])
    return sum(c for c in (content, style) if c is not None)


def layer_overlap(terms: list[Term], dtype) -> Overlap:
    by_role = {role: [t.factors for t in terms if t.role == role] for role in MERGE_ROLES}
    if not by_role["content"] or not by_role["style"]:
        return Overlap(None, None)
    ups = {r: torch.cat([f.up.flatten(1).to(dtype) for f in fs], 1) for r, fs in by_role.items()}
    downs = {r: torch.cat([f.down.flatten(1).to(dtype) for f in fs], 0).T for r, fs in by_role.items()}
    return Overlap(principal_cosines(ups["content"], ups["style"]), principal_cosines(downs["content"], downs["style"]))


def merge_layer(terms: list[Term], interference: str = "off", q_tolerance: float = 1e-4,
                dtype: torch.dtype = torch.float32) -> MergedLayer:
    """Merge the terms of one layer into one low-rank factor pair (see the module docstring)."""
    if not terms:
        raise ValueError("nothing to merge")
    shape = terms[0].factors.delta_shape
    for term in terms:
        if term.role not in MERGE_ROLES:
            raise ValueError(f"merge terms must be content or style, got {term.role!r}")
        if term.factors.delta_shape != shape:
            raise ValueError(f"adapters disagree on this layer's shape: {shape} vs {term.factors.delta_shape}")
    downs = [t.factors.down.flatten(1).to(dtype) for t in terms]
    signs = shared_q_signs(terms, q_tolerance)
    if signs is not None:
        basis = terms[0].factors.up.flatten(1).to(dtype)
        coefficients = [t.weight * t.factors.scale * s.to(dtype)[:, None] * d for t, s, d in zip(terms, signs, downs)]
        path = "shared-q" if len(terms) > 1 else "single adapter"
    else:
        ups = torch.cat([t.factors.up.flatten(1).to(dtype) for t in terms], 1)
        basis, r_up = torch.linalg.qr(ups, mode="reduced")
        offsets = torch.tensor([0] + [t.factors.rank for t in terms]).cumsum(0).tolist()
        coefficients = [t.weight * t.factors.scale * r_up[:, offsets[i]:offsets[i + 1]] @ downs[i]
                        for i, t in enumerate(terms)]
        path = "joint-basis"
    merged = apply_interference(role_coefficients(terms, coefficients), interference)
    rank = basis.shape[1]
    # contiguous: QR returns column-major factors, which make ComfyUI's patch matmul several times slower
    up = basis.contiguous().reshape(shape[0], rank, *([1] * (len(shape) - 2)))
    down = merged.contiguous().reshape(rank, *shape[1:])
    return MergedLayer(LowRank(up=up, down=down, alpha=None), path, layer_overlap(terms, dtype))


def merge_layers(terms_by_key: dict[str, list[Term]], interference: str = "off",
                 dtype: torch.dtype = torch.float32, on_layer=None) -> dict[str, MergedLayer]:
    """merge_layer for every key; ``on_layer()`` is called after each (progress, cancellation)."""
    merged = {}
    for key, terms in terms_by_key.items():
        merged[key] = merge_layer(terms, interference, dtype=dtype)
        if on_layer is not None:
            on_layer()
    return merged


def overlap_summary(layers: dict[str, MergedLayer]) -> list[str]:
    """A count of merge paths, then one line per layer: max and mean principal-angle cosines (out / in spaces)."""
    paths = [layer.path for layer in layers.values()]
    lines = [f"{len(layers)} layers: " + ", ".join(f"{paths.count(p)} {p}" for p in sorted(set(paths)))]
    for key, layer in layers.items():
        o = layer.overlap
        if o.column_cosines is None:
            lines.append(f"{key}: {layer.path}, content or style only")
            continue
        stats = [f"{name} max {c.max():.3f} mean {c.mean():.3f}" if c.numel() else f"{name} -"
                 for name, c in (("out", o.column_cosines), ("in", o.row_cosines))]
        lines.append(f"{key}: {layer.path}, overlap {', '.join(stats)}")
    return lines
