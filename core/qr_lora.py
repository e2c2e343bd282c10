"""QR-LoRA (Yang et al., ICCV 2025): a frozen orthonormal basis Q of a weight's top-r subspace.

    W (out, in)  --top-r SVD-->  core = U_r diag(S_r) Vh_r  --reduced QR-->  core = Q R
    Q (out, r) orthonormal, R (r, in) upper trapezoidal, W_res = W - Q R
    fine-tuned layer: W_res x + Q (R + ΔR) x  =  W x + Q ΔR x

So a QR-LoRA adaptation is a LoRA with up = Q and down = ΔR. Conv weights are flattened to
(out, in·kh·kw). Everything is computed in float32 (or float64 when given), whatever the model's dtype.
Sign convention: the diagonal of R is made non-negative, so Q is a deterministic function of W.

The top-r subspace comes from a randomized SVD by default (a fixed-seed rank-r sketch and two power
iterations, Halko et al. 2011), a few times the cost of one rank-r LoRA patch; "exact" runs the full SVD
(the official code's Q). ``fit_error`` = ||W - Q R||_F / ||W||_F says how good the subspace is: the exact
top-r factorisation has the smallest possible, sqrt(Σ_{i>r} σ_i²) / ||W||_F.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .adapter import LowRank

POWER_ITERATIONS = 2
SKETCH_SEED = 0  # one fixed sketch: the same W always gives the same Q, so conversions on one base share it
DENSE_ERROR_BELOW = 0.03  # below this, ||W||² - ||R||² cancels too much: fit_error from the dense residual


@dataclass(frozen=True)
class QRFactors:
    q: torch.Tensor  # (out, r), orthonormal columns
    r: torch.Tensor  # (r, in), upper trapezoidal
    weight: torch.Tensor  # (out, in) the factorised weight, flattened, in the compute dtype
    fit_error: float  # ||W - Q R||_F / ||W||_F

    @property
    def rank(self) -> int:
        return self.q.shape[1]

    @property
    def residual(self) -> torch.Tensor:
        """W_res = W - Q R, flattened like W."""
        return self.weight - self.q @ self.r


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def canonical_signs(q: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip column i of Q and row i of R together so that R[i, i] >= 0."""
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs, r * signs[:, None]


def exact_top_subspace(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, U_rᵀ W) from the full SVD: the top-r left singular vectors and W's coordinates in them."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank, None] * vh[:rank]


@functools.lru_cache(maxsize=16)
def gaussian_sketch(rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """The fixed-seed N(0, 1) test matrix (rows, columns); cached, as a model's layers share a few widths."""
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(SKETCH_SEED), dtype=dtype)


def cholesky_orthonormalised(sample: torch.Tensor) -> torch.Tensor:
    """Columns spanning ``sample``'s, orthonormal up to eps·cond²: Cholesky QR, half the cost of a Householder QR
    at these shapes; the Householder QR when cond(sample) > eps^(-1/4) (50 in float32) or the Gram does not factor."""
    lower, info = torch.linalg.cholesky_ex(sample.T @ sample)
    pivots = torch.diagonal(lower)
    if info or not pivots.min() > torch.finfo(sample.dtype).eps ** 0.25 * pivots.max():
        return torch.linalg.qr(sample).Q
    return torch.linalg.solve_triangular(lower.T, sample, upper=True, left=False)


def randomized_top_subspace(matrix: torch.Tensor, rank: int,
                            power_iterations: int = POWER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r, U_rᵀ W) with U_r = orth((W Wᵀ)^q W Ω), Ω a fixed-seed Gaussian (in, r): subspace iteration from a
    random start (Halko et al. 2011). No oversampling: the r-column sketch needs no r x r eigenproblem, which at
    small layers costs more than the products; the power iterations make up the accuracy. The exact SVD when
    r = min(out, in)."""
    if rank >= min(matrix.shape):
        return exact_top_subspace(matrix, rank)
    basis = matrix @ gaussian_sketch(matrix.shape[1], rank, matrix.dtype).to(matrix.device)
    for _ in range(power_iterations):  # normalised once per W Wᵀ step: float32 keeps directions down to sqrt(eps)·σ_1
        basis = matrix @ (matrix.T @ cholesky_orthonormalised(basis))
    basis = torch.linalg.qr(basis).Q  # (out, r), orthonormal to working precision
    return basis, basis.T @ matrix


TOP_SUBSPACES = {"randomized": randomized_top_subspace, "exact": exact_top_subspace}


def qr_of_projection(u: torch.Tensor, coordinates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q R = u @ coordinates with u orthonormal (out, r): only an r x r QR, never one of the out x in core.

    The core's first r columns are u M with M = coordinates[:, :r] = Q_m R_m, so Q = u Q_m, R = Q_mᵀ coordinates
    (whose first r columns are R_m: upper trapezoidal). Same Q and R as a QR of the dense core.
    """
    rank = u.shape[1]
    q_m, r_m = torch.linalg.qr(coordinates[:, :rank])
    r = torch.cat([r_m, q_m.T @ coordinates[:, rank:]], 1)
    return canonical_signs(u @ q_m, r)


def fit_error(matrix: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> float:
    """||W - Q R||_F / ||W||_F for R = Qᵀ W (Q R is W's projection onto span(Q), so ||W||² = ||W - Q R||² + ||R||²)."""
    total = float(torch.linalg.vector_norm(matrix)) ** 2
    if total == 0:
        return 0.0
    error = max(total - float(torch.linalg.vector_norm(r)) ** 2, 0.0) ** 0.5 / total ** 0.5
    if error < DENSE_ERROR_BELOW:
        error = float(torch.linalg.vector_norm(matrix - q @ r)) / total ** 0.5
    return error


def qr_factorise(weight: torch.Tensor, rank: int, svd: str = "randomized") -> QRFactors:
    """The QR-LoRA factorisation of a linear or conv weight, at the given rank (svd: "randomized" or "exact")."""
    matrix = weight.reshape(weight.shape[0], -1).to(compute_dtype(weight))
    limit = min(matrix.shape)
    if not 0 < rank <= limit:
        raise ValueError(f"rank must be between 1 and {limit} for a weight of shape {tuple(weight.shape)}, got {rank}")
    if svd not in TOP_SUBSPACES:
        raise ValueError(f"svd must be one of {sorted(TOP_SUBSPACES)}, got {svd!r}")
    q, r = qr_of_projection(*TOP_SUBSPACES[svd](matrix, rank))
    return QRFactors(q=q, r=r, weight=matrix, fit_error=fit_error(matrix, q, r))


def upper_triangular_mask(rank: int, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """The mask QR-LoRA training applies to ΔR (its upper triangle, rank x in)."""
    return torch.triu(torch.ones(rank, in_features, dtype=dtype))


@dataclass(frozen=True)
class Conversion:
    factors: LowRank  # up = Q, down = ΔR = Qᵀ ΔW (scale 1), extras: base_r
    residual_ratio: float  # ||ΔW - Q ΔR||_F / ||ΔW||_F, the part of ΔW outside span(Q)
    fit_error: float  # ||W - Q R||_F / ||W||_F of the base weight's rank-r fit (QRFactors.fit_error)


def convert_to_qr_lora(weight: torch.Tensor, delta: torch.Tensor, rank: int, svd: str = "randomized") -> Conversion:
    """Express an ordinary weight change ΔW in the QR-LoRA basis of its base weight W."""
    qr = qr_factorise(weight, rank, svd)
    change = delta.reshape(delta.shape[0], -1).to(qr.q.dtype)
    delta_r = qr.q.T @ change
    outside = change - qr.q @ delta_r
    norm = torch.linalg.matrix_norm(change)
    ratio = float(torch.linalg.matrix_norm(outside) / norm) if norm > 0 else 0.0
    down = delta_r.reshape(rank, *weight.shape[1:]) if weight.ndim == 4 else delta_r
    up = qr.q.reshape(qr.q.shape[0], rank, 1, 1) if weight.ndim == 4 else qr.q
    base_r = qr.r.reshape(rank, *weight.shape[1:]) if weight.ndim == 4 else qr.r
    return Conversion(LowRank(up=up, down=down, alpha=None, extras={"base_r": base_r}), ratio, qr.fit_error)


def convert_layers(deltas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], rank: int,
                   on_layer=None, svd: str = "randomized") -> dict[str, Conversion]:
    """convert_to_qr_lora for every key, with the rank capped by each weight's size."""
    converted = {}
    for key, delta in deltas.items():
        weight = weights[key]
        capped = min(rank, weight.shape[0], weight[0].numel())
        converted[key] = convert_to_qr_lora(weight, delta, capped, svd)
        if on_layer is not None:
            on_layer()
    return converted
