"""ZipLoRA (Shah et al., ECCV 2024, arXiv 2311.13600): merge a content and a style LoRA with learned per-column
coefficients, so that the merged model reproduces each LoRA's own prediction on that LoRA's own images.

Per layer, with ΔW_c, ΔW_s (out, in) the two changes at their strengths and m_c, m_s (in,) merger vectors (all ones
at the start: the direct merge ΔW_c + ΔW_s):

    ΔW_m = ΔW_c diag(m_c) + ΔW_s diag(m_s)          (Eq. 2: column j of ΔW times the j-th entry of m)
         = [s_c up_c | s_s up_s] · [down_c diag(m_c); down_s diag(m_s)]

so the result is exactly a plain LoRA of rank r_c + r_s (scale 1), which any LoRA loader applies. Conv layers have
their flattened (in · kh · kw) columns. The loss of one step (Eq. 3), with one noise and noise level for both
sets (as the common implementation, mkshing/ziplora-pytorch, draws them):

    L = mse(D⊕L_m(x_c, p_c), D⊕L_c(x_c, p_c)) + mse(D⊕L_m(x_s, p_s), D⊕L_s(x_s, p_s)) + λ Σ_layers penalty(m_c, m_s)

compared in the loss target's space (ε by default, as the paper's SDXL predicts noise). Penalties: 'mean |m_c ⊙ m_s|'
(mkshing's, which moves from the all-ones start), '|m_c · m_s|' (Eq. 3 as written) and '|cos(m_c, m_s)|' (the paper's
words; its gradient is zero at the all-ones start, where the two vectors are parallel). Paper defaults: λ 0.01,
learning rate 0.01, at most 100 steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import LowRank
from .training import (ADDED, Periodic, Recipe, TrainState, draw_batch, draw_second_batch, noisy_latent, optimise,
                       targets)

MEAN_PRODUCT, DOT, COSINE = "mean |m_c ⊙ m_s| (common implementation)", "|m_c · m_s| (paper Eq. 3)", "|cos(m_c, m_s)|"
PENALTIES = (MEAN_PRODUCT, DOT, COSINE)
DEFAULT_STEPS, DEFAULT_LR, DEFAULT_SIMILARITY_WEIGHT = 100, 0.01, 0.01
MERGED, CONTENT, STYLE = "merged", "content", "style"  # the three predictions a ZipLoRA step compares


def columns(factors: LowRank) -> int:
    """The number of ΔW's (flattened) input columns: the length of its merger vector."""
    return factors.down[0].numel()


def scaled(factors: LowRank, strength: float) -> LowRank:
    """The same change at ``strength`` with scale 1 (alpha / rank and the strength folded into up), in new tensors."""
    return LowRank(up=factors.up * (factors.scale * strength), down=factors.down.clone(), alpha=None)


@dataclass(frozen=True)
class ZipLayer:
    """One layer's two changes (scale 1; either may be absent) and their merger vectors."""

    content: LowRank | None
    style: LowRank | None
    m_content: torch.Tensor | None
    m_style: torch.Tensor | None

    def terms(self):
        return [(f, m) for f, m in ((self.content, self.m_content), (self.style, self.m_style)) if f is not None]

    @property
    def up(self) -> torch.Tensor:
        """[up_c | up_s] (out, r_c + r_s; 1x1 for conv layers): the merged LoRA's up."""
        flat = torch.cat([f.up.flatten(1) for f, _ in self.terms()], 1)
        return flat.reshape(*flat.shape, *self.terms()[0][0].up.shape[2:])

    @property
    def down(self) -> torch.Tensor:
        """[down_c diag(m_c); down_s diag(m_s)]: the merged LoRA's down (differentiable in the m's)."""
        parts = [f.down.flatten(1) * m.to(f.down.dtype) for f, m in self.terms()]
        return torch.cat(parts, 0).reshape(-1, *self.terms()[0][0].down.shape[1:])

    scale = 1.0

    def merged(self) -> LowRank:
        """The merged change as a plain LoRA (detached), what the saved file holds."""
        return LowRank(up=self.up.detach().clone(), down=self.down.detach().clone(), alpha=None)


def new_layer(content: LowRank | None, style: LowRank | None) -> ZipLayer:
    """A layer at the direct merge: merger vectors of ones (trainable) for each present change."""
    vectors = [None if f is None else torch.ones(columns(f), requires_grad=True) for f in (content, style)]
    return ZipLayer(content, style, *vectors)


def penalty(layers: dict[str, ZipLayer], kind: str) -> torch.Tensor:
    """Σ over layers that have both changes of the chosen similarity of m_c and m_s."""
    if kind not in PENALTIES:
        raise ValueError(f"penalty must be one of {PENALTIES}, got {kind!r}")
    total = torch.zeros(())
    for layer in layers.values():
        if layer.m_content is None or layer.m_style is None:
            continue
        a, b = layer.m_content, layer.m_style
        if kind == MEAN_PRODUCT:
            total = total + (a * b).abs().mean()
        elif kind == DOT:
            total = total + (a * b).sum().abs()
        else:
            total = total + torch.nn.functional.cosine_similarity(a, b, dim=0).abs()
    return total


def distillation_mse(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, merged_hat: torch.Tensor,
                     teacher_hat: torch.Tensor, target: str, noising: str = ADDED) -> torch.Tensor:
    """Mean squared difference of the merged and the teacher prediction, both in the target's space."""
    ours = targets(x0, noise, sigma, merged_hat, target, noising)[0]
    theirs = targets(x0, noise, sigma, teacher_hat, target, noising)[0]
    return (ours.float() - theirs.float()).pow(2).mean()


def ziplora_loss(predict, x_content, x_style, noise, sigma, conds_content, conds_style, layers, target: str,
                 kind: str, weight: float, noising: str = ADDED) -> torch.Tensor:
    """Eq. 3 for one batch: ``predict(which, x_σ, σ, conds) -> x̂0`` with which in MERGED / CONTENT / STYLE (the
    teachers run without gradient); the merged model predicts both sets in one call."""
    noisy_c, noisy_s = (noisy_latent(x, noise, sigma, noising) for x in (x_content, x_style))
    merged = predict(MERGED, torch.cat([noisy_c, noisy_s]), sigma.repeat(2), conds_content + conds_style)
    merged_c, merged_s = merged.split(len(x_content))
    with torch.no_grad():
        teacher_c = predict(CONTENT, noisy_c, sigma, conds_content)
        teacher_s = predict(STYLE, noisy_s, sigma, conds_style)
    return (distillation_mse(x_content, noise, sigma, merged_c, teacher_c, target, noising)
            + distillation_mse(x_style, noise, sigma, merged_s, teacher_s, target, noising)
            + weight * penalty(layers, kind))


def parameters(layers: dict[str, ZipLayer]) -> dict[str, torch.Tensor]:
    """'<layer>.m_content' / '<layer>.m_style' -> merger vector: what the optimiser trains."""
    found = {}
    for key, layer in layers.items():
        for part in ("m_content", "m_style"):
            if getattr(layer, part) is not None:
                found[f"{key}.{part}"] = getattr(layer, part)
    return found


def train_ziplora(predict, content: tuple[torch.Tensor, list], style: tuple[torch.Tensor, list], sigmas: torch.Tensor,
                  layers: dict[str, ZipLayer], recipe: Recipe, kind: str = MEAN_PRODUCT,
                  weight: float = DEFAULT_SIMILARITY_WEIGHT, state: TrainState | None = None, on_step=None,
                  periodic: tuple[Periodic, ...] = (), noising: str = ADDED) -> TrainState:
    """Train the merger vectors on the engine: each micro-batch draws a batch of each set (one noise, one noise
    level per sample for both) and takes Eq. 3's loss. ``content`` / ``style``: (model-space latents, conds)."""
    recipe.check()
    if tuple(content[0].shape[1:]) != tuple(style[0].shape[1:]):
        raise ValueError(f"the style images' latents are {tuple(style[0].shape[1:])}, the content images' "
                         f"{tuple(content[0].shape[1:])}: give both sets at one resolution")

    def micro_loss(step: int, micro: int):
        rows, x_content, sigma, noise = draw_batch(content[0], sigmas, recipe, step, micro)
        other, x_style = draw_second_batch(style[0], recipe, step, micro)
        return ziplora_loss(predict, x_content, x_style, noise, sigma, [content[1][i] for i in rows],
                            [style[1][i] for i in other], layers, recipe.phase_at(step).target, kind, weight, noising)

    return optimise(parameters(layers), micro_loss, recipe.steps, recipe.lr_at, recipe.optimiser, None, state, on_step,
                    periodic)
