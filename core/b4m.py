"""B4M (Break-for-Make, Xu et al., arXiv 2403.19456): Partly Learnable Projection factors, the make stage and the
preconditioned gradient of its joint fine-tune. Pure (torch only); the trainers are nodes/train_b4m.py.

A B4M LoRA on a linear layer W (out, in) is ΔW = up @ down, up (out, r), down (r, in), scale 1 (the official code
has no alpha). As in the official code (ICTMCG/Break-for-make, models/lora.py and train_*.py):

- Partly Learnable Projection: the first half of up's rows (up[:out // 2]) and the first half of down's columns
  (down[:, :in // 2]) are frozen; the other halves train.
- Init: down ~ N(0, 1/r²), up = 0; for square layers (out == in) the frozen halves are replaced by disjoint random
  row subsets of one orthonormal basis of max(1280, in) x r: down[:, :in/2] = basis[rows1]ᵀ, up[:out/2] = basis[rows2].
  Not in the official code: ``non_square=True`` does the same on non-square layers (a basis of max(1280, in, out) rows,
  in/2 rows for down, out/2 for up), whose up then has a frozen half that is not zero; square layers draw exactly as
  without it.
  Every draw comes from a generator seeded by (seed, layer name), so a content run and a style run with one seed
  start from identical factors and share their frozen halves.
- Break (each run): the content run trains down's free half on the content images and up's free half on
  auxiliary style data; the style run trains up's free half on the style images and down's free half on
  auxiliary content data.
- Make: down = [style's frozen half | content's trained half], up = style's up.
- The make stage's joint fine-tune may precondition the gradients (the official AdamWr):
  grad_up <- grad_up (down downᵀ + λI)⁻¹, grad_down <- (upᵀ up + λI)⁻¹ grad_down.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .adapter import LowRank, is_pointwise_weight
from . import metadata as META

SEED_KEY = META.B4M_SEED  # file metadata: the seed of the frozen halves
RUN_KEY = META.B4M_RUN  # file metadata: content, style or made
BASIS_ROWS = 1280  # the official orthonormal basis has 1280 rows (SDXL's widest attention layer)
RUNS = ("content", "style")
# which factor each run trains on its main images; the other factor trains on the auxiliary data
MAIN_PART = {"content": "down", "style": "up"}


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, layer name): the same layer starts the same in every run of one seed."""
    mixed = np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(mixed))


def frozen_masks(shape: tuple[int, ...], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up mask (out, r), down mask (r, in); with (1, 1) trailing for a 1x1 conv): 0 on the frozen halves (up's
    first out//2 rows, down's first in//2 columns), 1 where the factor trains."""
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    up, down = torch.ones(out_dim, rank, *kernel), torch.ones(rank, in_dim, *kernel)
    up[: out_dim // 2] = 0
    down[:, : in_dim // 2] = 0
    return up, down


def plp_lora(shape: tuple[int, ...], rank: int, seed: int, name: str, orthogonal: bool = True,
             non_square: bool = False) -> LowRank:
    """Fresh Partly Learnable Projection factors for a linear layer of weight ``shape`` (see the module docstring)."""
    if not is_pointwise_weight(shape):
        raise ValueError(f"B4M adapts linear layers and 1x1 convs; {name} has a weight of shape {tuple(shape)}")
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    rank = min(rank, out_dim, in_dim)
    generator = layer_generator(seed, name)
    down = torch.randn(rank, in_dim, generator=generator) / rank
    up = torch.zeros(out_dim, rank)
    if orthogonal and (out_dim == in_dim or non_square):
        rows = max(BASIS_ROWS, in_dim, out_dim)
        basis, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
        basis = basis.float()
        half_in, half_out = in_dim // 2, out_dim // 2
        order = torch.randperm(rows, generator=generator)
        down[:, :half_in] = basis[order[:half_in]].T
        up[:half_out] = basis[order[half_in:half_in + half_out]]
    return LowRank(up=up.reshape(out_dim, rank, *kernel), down=down.reshape(rank, in_dim, *kernel), alpha=None)


def frozen_halves(factors: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    """(up's frozen rows, down's frozen columns) of a B4M module."""
    up, down = factors.up.flatten(1), factors.down.flatten(1)
    return up[: up.shape[0] // 2], down[:, : down.shape[1] // 2]


def make(content: dict[str, LowRank], style: dict[str, LowRank], content_seed: str = "unknown",
         style_seed: str = "unknown") -> dict[str, LowRank]:
    """The make stage: per layer down = [style's frozen half | content's trained half], up = style's up.

    Refuses runs on other layers or with other ranks, and runs whose frozen halves differ (naming both seeds)."""
    if sorted(content) != sorted(style):
        only_c, only_s = sorted(set(content) - set(style)), sorted(set(style) - set(content))
        raise ValueError(f"the content and style runs adapt different layers (only content: {only_c[:3]}, only style: "
                         f"{only_s[:3]}); train both with the same targets")
    made, differing = {}, []
    for name in sorted(content):
        c, s = content[name], style[name]
        if c.up.shape != s.up.shape or c.down.shape != s.down.shape:
            raise ValueError(f"layer {name}: the content run's factors are {tuple(c.up.shape)} / {tuple(c.down.shape)}, "
                             f"the style run's {tuple(s.up.shape)} / {tuple(s.down.shape)}; train both with one rank")
        if c.scale != s.scale:
            raise ValueError(f"layer {name}: the runs have different scales ({c.scale}, {s.scale})")
        if not all(torch.equal(a.float(), b.float()) for a, b in zip(frozen_halves(c), frozen_halves(s))):
            differing.append(name)
            continue
        half = c.down.shape[1] // 2
        down = torch.cat([s.down[:, :half], c.down[:, half:]], dim=1).clone()
        made[name] = LowRank(up=s.up.clone(), down=down, alpha=s.alpha)
    if differing:
        raise ValueError(f"the content run (seed {content_seed}) and the style run (seed {style_seed}) have different "
                         f"frozen halves in {len(differing)} of {len(content)} layers (first: {differing[0]}); B4M can "
                         f"only make runs trained from one seed and one init (orthogonal_init, orthogonal_non_square)")
    return made


def preconditioned(grad_up: torch.Tensor, grad_down: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   reg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The official make stage's preconditioned gradients (AdamWr in custom_optimizer.py):
    grad_up (down downᵀ + λI)⁻¹ and (upᵀ up + λI)⁻¹ grad_down. As there, a Gram matrix whose norm is at most 1e-6
    (a factor still at zero) leaves its gradient unchanged."""
    up2, down2 = up.detach().flatten(1).float(), down.detach().flatten(1).float()
    eye = torch.eye(down2.shape[0])
    gram_down = down2 @ down2.T + reg * eye
    gram_up = up2.T @ up2 + reg * eye
    new_up, new_down = grad_up.flatten(1).float(), grad_down.flatten(1).float()
    if torch.linalg.norm(down2 @ down2.T) > 1e-6:
        new_up = torch.linalg.solve(gram_down, new_up.T, left=True).T  # gram_down is symmetric
    if torch.linalg.norm(up2.T @ up2) > 1e-6:
        new_down = torch.linalg.solve(gram_up, new_down)
    return new_up.reshape(grad_up.shape).to(grad_up.dtype), new_down.reshape(grad_down.shape).to(grad_down.dtype)


def precondition_all(pairs: list[tuple[torch.Tensor, torch.Tensor]], reg: float) -> None:
    """Replace the gradients of every (up, down) pair in place by their preconditioned form."""
    for up, down in pairs:
        if up.grad is None or down.grad is None:
            continue
        up.grad, down.grad = preconditioned(up.grad, down.grad, up, down, reg)
