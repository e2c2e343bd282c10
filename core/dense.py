"""Dense weight changes of the kinds the pack does not factor itself (LoHa, LoKr, OFT, DoRA, diffs, ...), for merges.

ComfyUI computes each module's change at the base weight (exact for additive kinds; for multiplicative ones, DoRA and
OFT / BOFT, it is the exact change at that base), with float32 factors as when it patches a model. A matrix change
enters a merge in an exact low-rank form: the smallest rank found whose relative (Frobenius) error is within
``RELATIVE_TOLERANCE``, above the float32 rounding of the change itself. Ranks are tried from 8 upward (a randomized
range finder, Halko et al. 2011, checked against the whole change, then an SVD of the small projected matrix to drop
unneeded directions); where no form smaller than the dense change exists (LoKr and OFT changes are full rank), the
change is kept whole as (identity, ΔW). The error of the float32 factors is measured and reported. A change of a
vector (a bias, a norm's weight) cannot be low-rank: it is carried as a diff, summed with its weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank, ModuleTensors
from .layouts import KIND_OF_PART

RELATIVE_TOLERANCE = 1e-6  # float32 rounding of a computed change is about 6e-8 of it
FIRST_RANK = 8
FLOAT32_SCREEN = 1e-4  # a float32 search step sees residuals down to ~1e-6 only; candidates are checked in float64


@dataclass(frozen=True)
class LowRankForm:
    factors: LowRank  # scale 1, shaped like the weight (conv: kernel in down, 1x1 up)
    full_rank: int  # min(out, in · kernel): the rank a dense change can have
    relative_error: float  # ||ΔW - up @ down||_F / ||ΔW||_F, of the float32 factors

    def describe(self, kinds: tuple[str, ...]) -> str:
        whole = " (kept whole: no smaller form)" if self.factors.rank == self.full_rank else ""
        return (f"{' + '.join(kinds)} as ΔW of rank {self.factors.rank} of {self.full_rank}{whole}, relative error "
                f"{self.relative_error:.1e}")


def _projected(matrix: torch.Tensor, sketch: torch.Tensor):
    """(basis, basis.T @ matrix) for an orthonormal basis of matrix @ sketch (a random sample of its column space)."""
    basis = torch.linalg.qr(matrix @ sketch.to(matrix.dtype), mode="reduced")[0]
    return basis, basis.T @ matrix


def _smallest_form(matrix: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up, down) with up @ down within ``tolerance`` of the float64 matrix when a low-rank form smaller than the
    matrix exists, None when it is kept whole. Ranks are screened in float32 (cheap), checked and made in float64."""
    out_dim, in_dim = matrix.shape
    norm = torch.linalg.matrix_norm(matrix)
    if norm == 0:
        return torch.zeros(out_dim, 1, dtype=matrix.dtype), torch.zeros(1, in_dim, dtype=matrix.dtype)
    single = matrix.to(torch.float32)
    generator = torch.Generator().manual_seed(0)
    rank = FIRST_RANK
    while rank * (out_dim + in_dim) < out_dim * in_dim:
        sketch = torch.randn(in_dim, rank, generator=generator, dtype=torch.float64)
        basis, small = _projected(single, sketch)
        if torch.linalg.matrix_norm(single - basis @ small) <= FLOAT32_SCREEN * norm:
            basis, small = _projected(matrix, sketch)
            budget = (tolerance * norm) ** 2 - torch.linalg.matrix_norm(matrix - basis @ small) ** 2
            if budget >= 0:
                u, s, vh = torch.linalg.svd(small, full_matrices=False)
                tails = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)])  # tails[k] = Σ_{j≥k} s_j²
                keep = max(1, int((tails > budget).sum()))
                root = s[:keep].sqrt()
                return basis @ (u[:, :keep] * root), root[:, None] * vh[:keep]
        rank *= 4
    return None


def exact_lowrank(delta: torch.Tensor, tolerance: float = RELATIVE_TOLERANCE) -> LowRankForm:
    """The exact low-rank form of a dense change (out, in, *kernel); see the module docstring."""
    matrix = delta.reshape(delta.shape[0], -1).to(torch.float64)
    single = matrix.to(torch.float32)
    form = _smallest_form(matrix, tolerance / 2)
    if form is None:  # kept whole as (identity, ΔW) on its smaller side; its error is float32 rounding alone
        up, down = (torch.eye(matrix.shape[0]), single) if matrix.shape[0] <= matrix.shape[1] else \
            (single, torch.eye(matrix.shape[1]))
        approximation = single.double()
    else:
        up, down = (f.to(torch.float32) for f in form)
        approximation = up.double() @ down.double()
    norm = torch.linalg.matrix_norm(matrix)
    error = float(torch.linalg.matrix_norm(matrix - approximation) / norm) if norm > 0 else 0.0
    rank, kernel = up.shape[1], delta.shape[2:]
    factors = LowRank(up=up.reshape(up.shape[0], rank, *([1] * len(kernel))), down=down.reshape(rank, *delta.shape[1:]))
    return LowRankForm(factors, min(matrix.shape), error)


def sum_diffs(diffs: dict[str, list[tuple[torch.Tensor, float]]]) -> dict[str, torch.Tensor]:
    """{model key: Σ weight · change} for changes carried as diffs (biases, norm weights), in float32."""
    return {key: sum(weight * change.to(torch.float64) for change, weight in terms).to(torch.float32)
            for key, terms in diffs.items()}


def carried_diffs(changes: dict[str, torch.Tensor]) -> dict[str, ModuleTensors]:
    """{weight key: the module's ComfyUI diffs}: a bias change as 'diff_b', a vector weight's change as 'diff'."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, change in changes.items():
        weight_key, part = (key[: -len(".bias")] + ".weight", "diff_b") if key.endswith(".bias") else (key, "diff")
        parts.setdefault(weight_key, {})[part] = change
    return {key: ModuleTensors(tuple(KIND_OF_PART[p] for p in sorted(found)), dict(sorted(found.items())))
            for key, found in parts.items()}
