"""Dense weight changes of the kinds the pack does not factor itself (LoHa, LoKr, OFT, DoRA, diffs, ...), for merges.

ComfyUI computes each module's change at the base weight (exact for additive kinds; for multiplicative ones, DoRA and
OFT / BOFT, it is the exact change at that base). A matrix change enters a merge in its exact low-rank form, from its
SVD: singular values above ``SVD_TOLERANCE`` of the largest are kept (the rest are float rounding), and the relative
error of the float32 factors is measured and reported. A change of a vector (a bias, a norm's weight) cannot be
low-rank: it is carried as a diff, summed with its weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank, ModuleTensors
from .layouts import KIND_OF_PART

SVD_TOLERANCE = 1e-7  # below float32's resolution of the largest singular value


@dataclass(frozen=True)
class LowRankForm:
    factors: LowRank  # scale 1, shaped like the weight (conv: kernel in down, 1x1 up)
    full_rank: int  # min(out, in · kernel): the rank a dense change can have
    relative_error: float  # ||ΔW - up @ down||_F / ||ΔW||_F, of the float32 factors

    def describe(self, kinds: tuple[str, ...]) -> str:
        return (f"{' + '.join(kinds)} as ΔW of rank {self.factors.rank} of {self.full_rank} (singular values above "
                f"{SVD_TOLERANCE:g} of the largest), relative error {self.relative_error:.1e}")


def exact_lowrank(delta: torch.Tensor, tolerance: float = SVD_TOLERANCE) -> LowRankForm:
    """The low-rank form of a dense change (out, in, *kernel), kept to ``tolerance``; a zero change gives rank 1 zeros."""
    matrix = delta.reshape(delta.shape[0], -1).to(torch.float64)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = max(1, int((s > tolerance * s[0]).sum())) if s.numel() and s[0] > 0 else 1
    root = s[:rank].sqrt()
    up, down = (u[:, :rank] * root).to(torch.float32), (root[:, None] * vh[:rank]).to(torch.float32)
    norm = torch.linalg.matrix_norm(matrix)
    error = float(torch.linalg.matrix_norm(matrix - up.double() @ down.double()) / norm) if norm > 0 else 0.0
    kernel = tuple(delta.shape[2:])
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
