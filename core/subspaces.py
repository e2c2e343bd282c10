"""Subspaces of low-rank factors from small products: orthonormal bases and principal angles.

Principal-angle cosines between the column spaces of tall factors A (n, a) and B (n, b) need only the r x r
Gram matrices AᵀA, BᵀB, AᵀB (O(n r²), never an n x n projector): with AᵀA = LaLaᵀ and BᵀB = LbLbᵀ they are
the singular values of La⁻¹ AᵀB Lb⁻ᵀ. 1 = a shared direction, 0 = orthogonal.
"""
from __future__ import annotations

from collections import defaultdict

import torch

# Cholesky of a Gram matrix, a pivot over its column's norm below this: the columns are too close to dependent
# for the fast path at the Gram's precision, and the layer's cosines are recomputed in float64 (eigen path)
MIN_PIVOT = {torch.float32: 0.1, torch.float64: 1e-4}


def orthonormal_basis(matrix: torch.Tensor, tolerance: float = 1e-6) -> torch.Tensor:
    """Orthonormal columns spanning the column space of ``matrix`` (rank-revealing, via SVD)."""
    u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        return u[:, :0]
    return u[:, s > tolerance * s[0]]


def principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the column spaces of a and b (descending)."""
    return principal_cosines_of_pairs([(a, b)])[0]


def principal_cosines_of_pairs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """principal_cosines of many (a, b) pairs of tall factors, from r x r products only.

    With Gram matrices AᵀA = LaLaᵀ and BᵀB = LbLbᵀ, the cosines are the singular values of La⁻¹ AᵀB Lb⁻ᵀ;
    the Cholesky factors, solves and SVDs run batched over pairs of equal ranks, in the factors' dtype.
    Pairs whose columns are (nearly) dependent take the eigen path in float64 instead.
    """
    grams = [(a.T @ a, b.T @ b, a.T @ b) for a, b in pairs]
    cosines: list[torch.Tensor | None] = [None] * len(pairs)
    by_shape = defaultdict(list)
    for index, (_, _, cross) in enumerate(grams):
        by_shape[(tuple(cross.shape), cross.dtype)].append(index)
    for (_, dtype), indices in by_shape.items():
        gram_a, gram_b, cross = (torch.stack([grams[i][j] for i in indices]) for j in range(3))
        lower_a, info_a = torch.linalg.cholesky_ex(gram_a)
        lower_b, info_b = torch.linalg.cholesky_ex(gram_b)
        fast = (info_a == 0) & (info_b == 0) & well_conditioned(lower_a, gram_a) & well_conditioned(lower_b, gram_b)
        if not fast.all():  # failed factors hold NaN: swap in the identity to keep the batch finite
            lower_a = torch.where(fast[:, None, None], lower_a, torch.eye(gram_a.shape[-1], dtype=dtype))
            lower_b = torch.where(fast[:, None, None], lower_b, torch.eye(gram_b.shape[-1], dtype=dtype))
            cross = torch.where(fast[:, None, None], cross, 0.0)
        m = torch.linalg.solve_triangular(lower_a, cross, upper=False)
        m = torch.linalg.solve_triangular(lower_b, m.mT, upper=False).mT
        batch = torch.linalg.svdvals(m).clamp(0.0, 1.0)
        for position, index in enumerate(indices):
            cosines[index] = batch[position] if fast[position] else cosines_by_eigen(*pairs[index]).to(dtype)
    return cosines


def well_conditioned(lower: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Per batch item: is every Cholesky pivot, relative to its column's norm (the distance of the unit column
    from the span of the ones before it), above MIN_PIVOT for this precision?"""
    pivots = torch.diagonal(lower, dim1=-2, dim2=-1) / torch.diagonal(gram, dim1=-2, dim2=-1).sqrt()
    return pivots.amin(-1) > MIN_PIVOT.get(gram.dtype, MIN_PIVOT[torch.float32])


def whitening(gram: torch.Tensor, tolerance: float = 1e-12) -> torch.Tensor:
    """W (r, k) with Wᵀ G W = I_k over G's eigenvalues above tolerance·max (singular values above 1e-6·max)."""
    values, vectors = torch.linalg.eigh(gram)
    if values.numel() == 0 or values[-1] <= 0:
        return vectors[:, :0]
    keep = values > tolerance * values[-1]
    return vectors[:, keep] / values[keep].sqrt()


def cosines_by_eigen(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """principal_cosines for rank-deficient or ill-conditioned factors: float64 Gram matrices, eigen-whitened."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    wa, wb = whitening(a64.T @ a64), whitening(b64.T @ b64)
    if wa.shape[1] == 0 or wb.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(wa.T @ (a64.T @ b64) @ wb).clamp(0.0, 1.0)


def row_space(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns (in, k) spanning the rows of ``matrix``: its QR when the rows are clearly independent
    (the common case, several times cheaper), else the rank-revealing SVD."""
    q, r = torch.linalg.qr(matrix.T)
    pivots = torch.diagonal(r).abs()
    if pivots.numel() and pivots.min() > torch.finfo(r.dtype).eps ** 0.5 * pivots.max():
        return q
    return orthonormal_basis(matrix.T)
