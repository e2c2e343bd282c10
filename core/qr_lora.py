"""QR-LoRA (Yang et al., ICCV 2025): a frozen orthonormal basis Q of a weight's top-r subspace.

    W (out, in)  --top-r SVD-->  core = U_r diag(S_r) Vh_r  --reduced QR-->  core = Q R
    Q (out, r) orthonormal, R (r, in) upper trapezoidal, W_res = W - Q R
    fine-tuned layer: W_res x + Q (R + ΔR) x  =  W x + Q ΔR x

So a QR-LoRA adaptation is a LoRA with up = Q and down = ΔR. Conv weights are flattened to
(out, in·kh·kw). Everything is computed in float32 (or float64 when given), whatever the model's dtype.
Sign convention: the diagonal of R is made non-negative, so Q is a deterministic function of W.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank


@dataclass(frozen=True)
class QRFactors:
    q: torch.Tensor  # (out, r), orthonormal columns
    r: torch.Tensor  # (r, in), upper trapezoidal
    residual: torch.Tensor  # (out, in) = W - Q R, flattened like W

    @property
    def rank(self) -> int:
        return self.q.shape[1]


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def canonical_signs(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip column i of Q and row i of R together so that R[i, i] >= 0."""
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs, r * signs[:, None]


def qr_factorise(weight: torch.Tensor, rank: int) -> QRFactors:
    """The QR-LoRA factorisation of a linear or conv weight, at the given rank."""
    matrix = weight.reshape(weight.shape[0], -1).to(compute_dtype(weight))
    limit = min(matrix.shape)
    if not 0 < rank <= limit:
        raise ValueError(f"rank must be between 1 and {limit} for a weight of shape {tuple(weight.shape)}, got {rank}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    core = (u[:, :rank] * s[:rank]) @ vh[:rank]
    q, r = torch.linalg.qr(core, mode="reduced")
    q, r = canonical_signs(q[:, :rank], r[:rank])
    return QRFactors(q=q, r=r, residual=matrix - q @ r)


def upper_triangular_mask(rank: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """The mask QR-LoRA training applies to ΔR (its upper triangle, rank x in)."""
    return torch.triu(torch.ones(rank, in_features, dtype=dtype))


@dataclass(frozen=True)
class Conversion:
    factors: LowRank  # up = Q, down = ΔR = Qᵀ ΔW (scale 1), extras: base_r
    residual_ratio: float  # ||ΔW - Q ΔR||_F / ||ΔW||_F, the part of ΔW outside span(Q)


def convert_to_qr_lora(weight: torch.Tensor, delta: torch.Tensor, rank: int) -> Conversion:
    """Express an ordinary weight change ΔW in the QR-LoRA basis of its base weight W."""
    qr = qr_factorise(weight, rank)
    change = delta.reshape(delta.shape[0], -1).to(qr.q.dtype)
    delta_r = qr.q.T @ change
    outside = change - qr.q @ delta_r
    norm = torch.linalg.matrix_norm(change)
    ratio = float(torch.linalg.matrix_norm(outside) / norm) if norm > 0 else 0.0
    down = delta_r.reshape(rank, *weight.shape[1:]) if weight.ndim == 4 else delta_r
    up = qr.q.reshape(qr.q.shape[0], rank, 1, 1) if weight.ndim == 4 else qr.q
    base_r = qr.r.reshape(rank, *weight.shape[1:]) if weight.ndim == 4 else qr.r
    return Conversion(LowRank(up=up, down=down, alpha=None, extras={"base_r": base_r}), ratio)


def convert_layers(deltas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], rank: int,
                   on_layer=None) -> dict[str, Conversion]:
    """convert_to_qr_lora for every key, with the rank capped by each weight's size."""
    converted = {}
    for key, delta in deltas.items():
        weight = weights[key]
        capped = min(rank, weight.shape[0], weight[0].numel())
        converted[key] = convert_to_qr_lora(weight, delta, capped)
        if on_layer is not None:
            on_layer()
    return converted
