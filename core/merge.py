"""Merging content and style adapters into one low-rank update per layer (QR-LoRA's merge, generalised).

Per layer, with weights w_i = λ_role · strength_i and deltas ΔW_i = s_i up_i down_i:

- shared Q (QR-LoRA adapters of one base, up_i = Q up to column signs), the official formula:
      ΔW = Q (Σ w_i s_i ΔR_i)                                   rank r
- otherwise, "concatenated (fast)": no factorisation, the factors side by side,
      up = [w_1 s_1 up_1 … w_n s_n up_n], down = [down_1; …; down_n], ΔW = up down = Σ w_i ΔW_i   rank Σ r_i
- "joint orthonormal basis (compact)", and always with interference removal: one orthonormal basis for
  all up-spaces, [up_1 … up_n] = Q R_u (directions the up-spaces share kept once), and
      ΔW = Q Σ w_i s_i R_u[:, cols_i] down_i                     rank ≤ min(Σ r_i, out)
  which is exactly Σ w_i ΔW_i too, stored as one LoRA (up = Q, down = the summed coefficients).

Interference option: remove from the style coefficients their part in the content delta's input
(row) space, or the reverse, or both. The row space is where QR-LoRA's ΔR lives, so the option also
acts on shared-Q merges. Overlap report: principal-angle cosines between the content and the style
column spaces (outputs) and row spaces (inputs) of each layer: 1 identical, 0 orthogonal. They come
from the factors' r x r Gram matrices only (never a dense ΔW), with the small solves batched over layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank
from .subspaces import orthonormal_basis, principal_cosines_of_pairs, row_space

INTERFERENCE_MODES = ("off", "style without content directions", "content without style directions", "both")
MERGE_ROLES = ("content", "style")
CONCATENATED, JOINT_BASIS = "concatenated (fast)", "joint orthonormal basis (compact)"
MERGED_FORMS = (CONCATENATED, JOINT_BASIS)
OVERLAP_BOTH, OVERLAP_OUTPUT, OVERLAP_OFF = "output and input spaces", "output spaces", "off"
OVERLAP_SPACES = (OVERLAP_BOTH, OVERLAP_OUTPUT, OVERLAP_OFF)


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
    path: str  # "shared-q", "single adapter", "concatenated" or "joint-basis"
    overlap: Overlap


def shared_q_signs(terms: list[Term], tolerance: float, dtype=torch.float32) -> list[torch.Tensor] | None:
    """Per term, the column signs that make its up equal the first term's up; None when the ups differ."""
    first = terms[0].factors.up.flatten(1).to(dtype)
    ups = [term.factors.up.flatten(1).to(dtype) for term in terms[1:]]
    # ordinary LoRAs differ in the first row's magnitudes already: no pass over the whole ups
    if any(up.shape != first.shape or not torch.allclose(up[0].abs(), first[0].abs(), atol=tolerance, rtol=0)
           for up in ups):
        return None
    signs = [torch.ones(first.shape[1], dtype=dtype)]
    for up in ups:
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
    basis = row_space(other)
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


def side_by_side(tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
    """torch.cat, without the copy when there is one tensor."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def layer_overlaps(terms_by_key: dict[str, list[Term]], dtype, spaces: str = OVERLAP_BOTH) -> dict[str, Overlap]:
    """Every layer's Overlap in the asked ``spaces``, computed once for all layers (content and style factors of
    each role stacked). Its cost is about (out + in) r² per layer for both spaces, out r² for the output spaces."""
    if spaces not in OVERLAP_SPACES:
        raise ValueError(f"overlap report must be one of {OVERLAP_SPACES}, got {spaces!r}")
    sides = {OVERLAP_BOTH: ("out", "in"), OVERLAP_OUTPUT: ("out",), OVERLAP_OFF: ()}[spaces]
    pairs, keys = [], []
    for key, terms in terms_by_key.items():
        by_role = {role: [t.factors for t in terms if t.role == role] for role in MERGE_ROLES}
        if not sides or not by_role["content"] or not by_role["style"]:
            continue
        if "out" in sides:
            pairs.append(tuple(side_by_side([f.up.flatten(1).to(dtype) for f in by_role[r]], 1) for r in MERGE_ROLES))
        if "in" in sides:
            pairs.append(tuple(side_by_side([f.down.flatten(1).to(dtype) for f in by_role[r]], 0).T
                               for r in MERGE_ROLES))
        keys.append(key)
    cosines = iter(principal_cosines_of_pairs(pairs))
    overlaps = {key: Overlap(None, None) for key in terms_by_key}
    for key in keys:
        overlaps[key] = Overlap(*(next(cosines) if side in sides else None for side in ("out", "in")))
    return overlaps


def check_terms(terms: list[Term]) -> tuple[int, ...]:
    """The layer's delta shape, after checking that every term is content or style and has that shape."""
    if not terms:
        raise ValueError("nothing to merge")
    shape = terms[0].factors.delta_shape
    for term in terms:
        if term.role not in MERGE_ROLES:
            raise ValueError(f"merge terms must be content or style, got {term.role!r}")
        if term.factors.delta_shape != shape:
            raise ValueError(f"adapters disagree on this layer's shape: {shape} vs {term.factors.delta_shape}")
    return shape


def as_lowrank(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> LowRank:
    rank = up.shape[1]
    # contiguous: QR returns column-major factors, which make ComfyUI's patch matmul several times slower
    return LowRank(up=up.contiguous().reshape(shape[0], rank, *([1] * (len(shape) - 2))),
                   down=down.contiguous().reshape(rank, *shape[1:]), alpha=None)


def concatenated_factors(terms: list[Term], shape: tuple[int, ...], dtype) -> LowRank:
    """up = [w_i s_i up_i], down = [down_i]: exactly Σ w_i ΔW_i with no factorisation."""
    up = torch.cat([t.factors.up.flatten(1).to(dtype) * (t.weight * t.factors.scale) for t in terms], 1)
    return as_lowrank(up, torch.cat([t.factors.down.flatten(1).to(dtype) for t in terms], 0), shape)


def joint_basis(terms: list[Term], dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Q orthonormal spanning every up, and each term's weighted coefficients in it (ΔW_i w_i = Q c_i)."""
    basis, r_up = torch.linalg.qr(torch.cat([t.factors.up.flatten(1).to(dtype) for t in terms], 1), mode="reduced")
    pivots = torch.diagonal(r_up).abs()
    eps = torch.finfo(dtype).eps
    if pivots.numel() and 0 < pivots.max() and pivots.min() <= eps ** 0.5 * pivots.max():
        # the up-spaces share directions: keep them once (numerical rank as numpy.linalg.matrix_rank)
        rotation = orthonormal_basis(r_up, tolerance=eps * max(r_up.shape))
        basis, r_up = basis @ rotation, rotation.T @ r_up
    offsets = torch.tensor([0] + [t.factors.rank for t in terms]).cumsum(0).tolist()
    return basis, [t.weight * t.factors.scale * r_up[:, offsets[i]:offsets[i + 1]] @ t.factors.down.flatten(1).to(dtype)
                   for i, t in enumerate(terms)]


def merged_factors(terms: list[Term], interference: str, form: str, q_tolerance: float, dtype) -> tuple[LowRank, str]:
    """One layer's merged factors and the path taken (see the module docstring)."""
    shape = check_terms(terms)
    signs = shared_q_signs(terms, q_tolerance, dtype)
    if signs is not None:
        basis = terms[0].factors.up.flatten(1).to(dtype)
        coefficients = [t.weight * t.factors.scale * s.to(dtype)[:, None] * t.factors.down.flatten(1).to(dtype)
                        for t, s in zip(terms, signs)]
        path = "shared-q" if len(terms) > 1 else "single adapter"
    elif interference == "off" and form == CONCATENATED:
        return concatenated_factors(terms, shape, dtype), "concatenated"
    else:  # removal works on coefficients in one orthonormal basis
        (basis, coefficients), path = joint_basis(terms, dtype), "joint-basis"
    return as_lowrank(basis, apply_interference(role_coefficients(terms, coefficients), interference), shape), path


def merge_layers(terms_by_key: dict[str, list[Term]], interference: str = "off", dtype: torch.dtype = torch.float32,
                 on_layer=None, form: str = CONCATENATED, q_tolerance: float = 1e-4,
                 overlap: str = OVERLAP_BOTH) -> dict[str, MergedLayer]:
    """Merged factors for every key, then every layer's overlap (in the ``overlap`` spaces) at once; ``on_layer()``
    is called after each layer's factors (progress, cancellation)."""
    if form not in MERGED_FORMS:
        raise ValueError(f"merged form must be one of {MERGED_FORMS}, got {form!r}")
    merged = {}
    for key, terms in terms_by_key.items():
        merged[key] = merged_factors(terms, interference, form, q_tolerance, dtype)
        if on_layer is not None:
            on_layer()
    overlaps = layer_overlaps(terms_by_key, dtype, overlap)
    return {key: MergedLayer(factors, path, overlaps[key]) for key, (factors, path) in merged.items()}


def merge_layer(terms: list[Term], interference: str = "off", q_tolerance: float = 1e-4,
                dtype: torch.dtype = torch.float32, form: str = CONCATENATED) -> MergedLayer:
    """merge_layers for one layer."""
    return merge_layers({"layer": terms}, interference, dtype, form=form, q_tolerance=q_tolerance)["layer"]


def overlap_summary(layers: dict[str, MergedLayer]) -> list[str]:
    """A count of merge paths, then one line per layer: max and mean principal-angle cosines (out / in spaces)."""
    paths = [layer.path for layer in layers.values()]
    lines = [f"{len(layers)} layers: " + ", ".join(f"{paths.count(p)} {p}" for p in sorted(set(paths)))]
    for key, layer in layers.items():
        o = layer.overlap
        if o.column_cosines is None and o.row_cosines is None:
            lines.append(f"{key}: {layer.path}")
            continue
        stats = [f"{name} max {c.max():.3f} mean {c.mean():.3f}" if c.numel() else f"{name} -"
                 for name, c in (("out", o.column_cosines), ("in", o.row_cosines)) if c is not None]
        lines.append(f"{key}: {layer.path}, overlap {', '.join(stats)}")
    return lines
