"""The training engine: the one optimiser loop of the pack, and the diffusion loss every trainer runs on it.

Pure (torch and numpy only). The ComfyUI side (nodes/training.py) supplies a ``predict`` callable and the
model's sigma table; everything random here is drawn from generators seeded by (seed, step, micro-batch),
so a run resumed at step k draws exactly what an uninterrupted run draws from step k on.

Parameterisation: ComfyUI's k-diffusion form, used by its EPS and V_PREDICTION models::

    x_σ = x0 + σ ε                              noisy model-space latent at noise level σ
    x̂0 = predict(x_σ, σ, conds)                 the model's denoised output (BaseModel.apply_model)
    ε̂ = (x_σ − x̂0) / σ                          the noise the model believes it sees
    v = (ε − σ x0) / √(1 + σ²)                   DDPM's v with ᾱ = 1 / (1 + σ²) (z_t = √ᾱ x_σ)

Targets and their loss, each the per-sample mean over elements:

    epsilon   ||ε̂ − ε||²  = ||x̂0 − x0||² / σ²
    x0        ||x̂0 − x0||²                       ConsisLoRA's loss (ε-MSE × (1 − ᾱ)/ᾱ); TrainLoraNode's
    v         ||v̂ − v||²  = ||x̂0 − x0||² (1 + σ²) / σ²

Flow models (ComfyUI's CONST sampling: FLUX, SD3, and the other rectified-flow models) noise by interpolation,
with σ = t in (0, 1] drawn from the model's own table (its shift included):

    x_t = (1 − t) x0 + t ε                      the flow-matching path
    ε̂ = (x_t − (1 − t) x̂0) / t,  v̂ = (x_t − x̂0) / t     v = ε − x0, the velocity flow models are trained on

    epsilon   ||ε̂ − ε||²  = ||x̂0 − x0||² (1 − t)² / t²
    x0        ||x̂0 − x0||²
    v         ||v̂ − v||²  = ||x̂0 − x0||² / t²     (the flow-matching loss)

Min-SNR-γ weighting (Hang et al. 2023) with snr = 1/σ² (flow: ((1 − t)/t)²): each target's loss is divided by its
factor on ||x̂0 − x0||² above (epsilon snr; x0 1; v snr + 1, flow 1/t²) and multiplied by min(snr, γ), so every
target then weighs ||x̂0 − x0||² by min(snr, γ).
Noise offset: ε = N(0, I) + offset · N(0, 1) per (sample, channel).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

TARGETS = ("epsilon", "x0", "v")
ADDED, FLOW = "added noise", "flow"  # x_σ = x0 + σ ε (EPS, V_PREDICTION), or x_t = (1 − t) x0 + t ε (CONST)
NOISINGS = (ADDED, FLOW)
SCHEDULES = ("constant", "cosine", "linear")
OPTIMISERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


@dataclass(frozen=True)
class Phase:
    """Steps [previous phase's end, until) train toward ``target`` at learning rate ``lr`` (a hard switch)."""

    until: int
    target: str
    lr: float


@dataclass(frozen=True)
class Optimiser:
    name: str = "adamw"
    weight_decay: float = 1e-2
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    schedule: str = "constant"  # learning-rate factor over the whole run, times the phase's lr
    warmup_steps: int = 0  # linear warm-up from 0 before the schedule
    accumulation: int = 1  # micro-batches per optimiser step

    def check(self) -> None:
        if self.name not in OPTIMISERS:
            raise ValueError(f"optimiser must be one of {sorted(OPTIMISERS)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.accumulation < 1 or self.warmup_steps < 0:
            raise ValueError(f"accumulation must be >= 1 and warmup_steps >= 0, got {self.accumulation}, "
                             f"{self.warmup_steps}")


@dataclass(frozen=True)
class Recipe:
    """What a diffusion training run does, step by step."""

    phases: tuple[Phase, ...]
    batch_size: int = 1
    seed: int = 0
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0 = no weighting
    optimiser: Optimiser = field(default_factory=Optimiser)

    @property
    def steps(self) -> int:
        return self.phases[-1].until

    def phase_at(self, step: int) -> Phase:
        return next((p for p in self.phases if step < p.until), self.phases[-1])

    def check(self) -> None:
        self.optimiser.check()
        ends = [p.until for p in self.phases]
        if not ends or ends[0] < 1 or ends != sorted(set(ends)):
            raise ValueError(f"phases must end at strictly increasing steps >= 1, got {ends}")
        unknown = [p.target for p in self.phases if p.target not in TARGETS]
        if unknown:
            raise ValueError(f"loss targets must be among {TARGETS}, got {unknown}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step``: its phase's, times the schedule's factor."""
        return self.phase_at(step).lr * schedule_factor(self.optimiser, step, self.steps)

    def describe(self) -> dict:
        """The recipe as plain data (for a saved file's metadata)."""
        return {"phases": [vars(p) for p in self.phases], "batch_size": self.batch_size, "seed": self.seed,
                "noise_offset": self.noise_offset, "min_snr_gamma": self.min_snr_gamma,
                "optimiser": vars(self.optimiser)}


@dataclass
class TrainState:
    """Where a run is: steps done, the loss of each, the optimiser's state (torch state_dict form)."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    optimiser: dict | None = None


@dataclass(frozen=True)
class Periodic:
    """``run(step, state)`` after every ``every``-th optimiser step (previews, checkpoints); every 0 = never."""

    every: int
    run: Callable[[int, TrainState], None]


def schedule_factor(settings: Optimiser, step: int, steps: int) -> float:
    """Learning-rate factor at ``step`` of ``steps``: linear warm-up, then constant, cosine to 0 or linear to 0."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, steps - settings.warmup_steps)
    progress = (step - settings.warmup_steps) / span
    return {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1.0 - progress}[settings.schedule]


def seeded(*keys: int) -> torch.Generator:
    """A generator seeded by a tuple of integers (numpy's SeedSequence mixes them: no collisions by addition)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0]))


def backward_terms(terms, params: dict[str, torch.Tensor], divisor: float) -> float:
    """Back-propagate one micro-batch's loss; returns its value (the sum of its terms).

    ``terms`` is a loss tensor (its gradient reaches every parameter) or a sequence of (loss, parameter names or
    None) pairs: each term's gradient reaches only the named parameters (None: all). B4M's Multi-Correspondence
    Projection routes the main images' loss to one factor and the auxiliary data's loss to the other this way.
    """
    if torch.is_tensor(terms):
        (terms / divisor).backward()
        return float(terms.detach())
    value = 0.0
    for index, (loss, names) in enumerate(terms):
        chosen = [(n, t) for n, t in params.items() if names is None or n in names]
        grads = torch.autograd.grad(loss / divisor, [t for _, t in chosen], retain_graph=index + 1 < len(terms),
                                    allow_unused=True)
        for (_, tensor), grad in zip(chosen, grads):
            if grad is not None:
                tensor.grad = grad if tensor.grad is None else tensor.grad + grad
        value += float(loss.detach())
    return value


def param_groups(names: list[str], lr_scales: dict[str, float] | None) -> list[tuple[float, list[str]]]:
    """[(learning-rate factor, parameter names)], largest factor first: the optimiser's parameter groups. A saved
    optimiser state numbers the parameters in this order (``grouped_names``)."""
    factors = {name: float((lr_scales or {}).get(name, 1.0)) for name in names}
    return [(scale, [n for n in names if factors[n] == scale]) for scale in sorted(set(factors.values()), reverse=True)]


def grouped_names(names: list[str], lr_scales: dict[str, float] | None) -> list[str]:
    return [n for _, group in param_groups(names, lr_scales) for n in group]


def optimise(params: dict[str, torch.Tensor], micro_loss: Callable[[int, int], object], steps: int,
             lr_at: Callable[[int], float], settings: Optimiser, grad_masks: dict[str, torch.Tensor] | None = None,
             state: TrainState | None = None, on_step: Callable[[int, float], None] | None = None,
             periodic: tuple[Periodic, ...] = (), lr_scales: dict[str, float] | None = None,
             transform_grads: Callable[[], None] | None = None) -> TrainState:
    """The pack's one optimiser loop. Runs optimiser steps ``state.step`` .. ``steps - 1``.

    ``micro_loss(step, micro)`` returns the loss of one micro-batch (``settings.accumulation`` per step; their
    mean is the step's loss), or loss terms with the parameters each one trains (``backward_terms``).
    ``grad_masks`` freeze parts of a parameter: where the mask is 0 the entry gets no gradient and never changes
    (not even by weight decay; QR-LoRA's upper triangle, B4M's frozen halves). ``lr_scales`` multiply the
    learning rate of the named parameters (B4M's auxiliary factor). ``transform_grads()`` runs after the
    backward passes, before masking and clipping (B4M's preconditioned make stage). ``on_step(step, loss)`` runs
    after each step (progress; raising from it cancels). Returns the new state.
    """
    settings.check()
    state = state or TrainState()
    tensors = list(params.values())
    grouped = param_groups(list(params), lr_scales)
    scales = [scale for scale, _ in grouped]
    groups = [{"params": [params[n] for n in names]} for _, names in grouped]
    optimiser = OPTIMISERS[settings.name](groups, lr=lr_at(state.step), weight_decay=settings.weight_decay)
    if state.optimiser is not None:
        optimiser.load_state_dict(state.optimiser)
    masks = [(params[name], mask.to(params[name].dtype)) for name, mask in (grad_masks or {}).items()]
    losses = list(state.losses)
    for step in range(state.step, steps):
        for group, scale in zip(optimiser.param_groups, scales):
            group["lr"] = lr_at(step) * scale
        total = 0.0
        for micro in range(settings.accumulation):
            total += backward_terms(micro_loss(step, micro), params, settings.accumulation) / settings.accumulation
        if transform_grads is not None:
            transform_grads()
        for tensor, mask in masks:
            if tensor.grad is not None:
                tensor.grad.mul_(mask)
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tensors, settings.grad_clip)
        frozen = [(tensor, mask, tensor.detach().clone()) for tensor, mask in masks]
        optimiser.step()
        with torch.no_grad():
            for tensor, mask, before in frozen:  # decoupled weight decay would move frozen entries
                tensor.copy_(torch.where(mask.bool(), tensor, before))
        optimiser.zero_grad(set_to_none=True)
        losses.append(total)
        state = TrainState(step + 1, losses, None)
        if on_step is not None:
            on_step(step, total)
        due = [p for p in periodic if p.every > 0 and (step + 1) % p.every == 0]
        if due:
            state.optimiser = copy.deepcopy(optimiser.state_dict())  # tasks may keep it; the loop updates in place
            for task in due:
                task.run(step + 1, state)
    return replace(state, optimiser=optimiser.state_dict())


# -- diffusion -----------------------------------------------------------------------------------------------

def per_sample(sigma: torch.Tensor, ndim: int, dtype) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (ndim - 1))).to(dtype)


def noisy_latent(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, noising: str = ADDED) -> torch.Tensor:
    """x_σ = x0 + σ ε, or the flow path (1 − σ) x0 + σ ε."""
    if noising not in NOISINGS:
        raise ValueError(f"noising must be one of {NOISINGS}, got {noising!r}")
    s = per_sample(sigma, x0.ndim, x0.dtype)
    return x0 + s * noise if noising == ADDED else (1 - s) * x0 + s * noise


def targets(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor, target: str,
            noising: str = ADDED):
    """(prediction, true value) in the target's space, from the x0 prediction (see the module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"loss target must be one of {TARGETS}, got {target!r}")
    if target == "x0":
        return x0_hat, x0
    s = per_sample(sigma, x0.ndim, x0.dtype)
    noisy = noisy_latent(x0, noise, sigma, noising)
    if noising == FLOW:
        if target == "epsilon":
            return (noisy - (1 - s) * x0_hat) / s, noise
        return (noisy - x0_hat) / s, noise - x0
    eps_hat = (noisy - x0_hat) / s
    if target == "epsilon":
        return eps_hat, noise
    root = (1 + s ** 2).sqrt()
    return (eps_hat - s * x0_hat) / root, (noise - s * x0) / root


def min_snr_weight(sigma: torch.Tensor, target: str, gamma: float, noising: str = ADDED) -> torch.Tensor:
    """Per-sample Min-SNR-γ weight for the target's loss (1 when gamma is 0)."""
    if gamma <= 0:
        return torch.ones_like(sigma)
    s = sigma.double()
    snr = 1.0 / s ** 2 if noising == ADDED else ((1 - s) / s) ** 2
    factor = {"epsilon": snr, "x0": torch.ones_like(s), "v": snr + 1 if noising == ADDED else 1.0 / s ** 2}[target]
    return (snr.clamp(max=gamma) / factor).to(sigma.dtype)


def diffusion_loss(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, x0_hat: torch.Tensor, target: str,
                   min_snr_gamma: float = 0.0, noising: str = ADDED) -> torch.Tensor:
    """Weighted mean over the batch of each sample's mean squared error in the target's space."""
    prediction, truth = targets(x0, noise, sigma, x0_hat, target, noising)
    per_sample_error = (prediction.float() - truth.float()).pow(2).flatten(1).mean(1)
    return (per_sample_error * min_snr_weight(sigma.float(), target, min_snr_gamma, noising)).mean()


def draw_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator)
    return noise


def batch_indices(count: int, batch_size: int, seed: int, position: int) -> list[int]:
    """Dataset rows for the batch starting at sample ``position``: each epoch is one seeded permutation."""
    rows, cache = [], {}
    for p in range(position, position + batch_size):
        epoch = p // count
        if epoch not in cache:
            cache[epoch] = torch.randperm(count, generator=seeded(seed, 1, epoch)).tolist()
        rows.append(cache[epoch][p % count])
    return rows


@dataclass(frozen=True)
class SecondSet:
    """A second data set trained in the same step: its loss uses the main batch's noise and noise levels (B4M's
    Multi-Correspondence Projection and make stage). ``main`` / ``second``: the parameter names each loss trains
    (None: every trained parameter)."""

    latents: torch.Tensor
    conds: list
    main: tuple[str, ...] | None = None
    second: tuple[str, ...] | None = None


def train_diffusion(predict, latents: torch.Tensor, conds: list, sigmas: torch.Tensor, params: dict[str, torch.Tensor],
                    recipe: Recipe, grad_masks=None, state: TrainState | None = None, on_step=None,
                    periodic: tuple[Periodic, ...] = (), second: SecondSet | None = None,
                    lr_scales: dict[str, float] | None = None, transform_grads=None,
                    noising: str = ADDED) -> TrainState:
    """Train ``params`` so that ``predict(x_σ, σ, [conds[i] for i in batch]) -> x̂0`` denoises ``latents``.

    ``latents`` (N, C, H, W) are model-space latents, ``conds[i]`` their conditioning (passed through), ``sigmas``
    the model's noise levels (its own table, drawn uniformly), ``noising`` how the model noises a latent with them
    (added noise, or the flow path). The loss target and learning rate
    follow the recipe's phases. With a ``second`` set, each micro-batch also draws a batch of it (its own seeded
    order) and noises it with the same noise and noise levels; one model call predicts both, and each loss trains
    the parameters the set names. The step's loss is then the sum of both.
    """
    recipe.check()
    if second is not None and tuple(second.latents.shape[1:]) != tuple(latents.shape[1:]):
        raise ValueError(f"the second data set's latents are {tuple(second.latents.shape[1:])}, the main set's "
                         f"{tuple(latents.shape[1:])}: train both at one resolution")

    def micro_loss(step: int, micro: int):
        rows, x0, sigma, noise = draw_batch(latents, sigmas, recipe, step, micro)
        target = recipe.phase_at(step).target
        gamma = recipe.min_snr_gamma
        if second is None:
            x0_hat = predict(noisy_latent(x0, noise, sigma, noising), sigma, [conds[i] for i in rows])
            return diffusion_loss(x0, noise, sigma, x0_hat, target, gamma, noising)
        other, x1 = draw_second_batch(second.latents, recipe, step, micro)
        both = torch.cat([x0, x1])
        x0_hat = predict(noisy_latent(both, noise.repeat(2, *([1] * (noise.ndim - 1))), sigma.repeat(2), noising),
                         sigma.repeat(2), [conds[i] for i in rows] + [second.conds[i] for i in other])
        main_hat, second_hat = x0_hat.split(len(rows))
        return ((diffusion_loss(x0, noise, sigma, main_hat, target, gamma, noising), second.main),
                (diffusion_loss(x1, noise, sigma, second_hat, target, gamma, noising), second.second))

    return optimise(params, micro_loss, recipe.steps, recipe.lr_at, recipe.optimiser, grad_masks, state, on_step,
                    periodic, lr_scales, transform_grads)


def draw_batch(latents: torch.Tensor, sigmas: torch.Tensor, recipe: Recipe, step: int, micro: int):
    """(rows, x0, σ, ε) of one micro-batch: the dataset rows (each epoch one seeded permutation), their latents, a
    noise level per sample drawn uniformly from the model's table ``sigmas``, and the noise; all from generators
    seeded by (seed, step, micro), so a resumed run draws what an uninterrupted one does."""
    generator = seeded(recipe.seed, 2, step, micro)
    position = (step * recipe.optimiser.accumulation + micro) * recipe.batch_size
    rows = batch_indices(len(latents), recipe.batch_size, recipe.seed, position)
    x0 = latents[rows]
    sigma = sigmas[torch.randint(0, len(sigmas), (len(rows),), generator=generator)]
    noise = draw_noise(tuple(x0.shape), recipe.noise_offset, generator).to(x0.dtype)
    return rows, x0, sigma.to(x0.dtype), noise


def draw_second_batch(latents: torch.Tensor, recipe: Recipe, step: int, micro: int):
    """(rows, latents) of a second data set's micro-batch drawn beside draw_batch's (its own seeded order), noised
    with the first batch's noise and noise levels."""
    position = (step * recipe.optimiser.accumulation + micro) * recipe.batch_size
    rows = batch_indices(len(latents), recipe.batch_size, recipe.seed + 7919, position)
    return rows, latents[rows]


# -- optimiser state as named tensors (for safetensors) -----------------------------------------------------

def optimiser_state_tensors(state: dict, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a torch optimiser state_dict into named tensors ('<param name>.<slot>') and JSON-able rest."""
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{names[index]}.{slot}"] = value
            else:
                scalars[f"{names[index]}.{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimiser_state_from_tensors(tensors: dict[str, torch.Tensor], rest: dict, names: list[str]) -> dict:
    """The inverse of optimiser_state_tensors, for the parameters in ``names`` order."""
    state: dict[int, dict] = {}
    for index, name in enumerate(names):
        prefix = name + "."
        slots = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        slots.update({k[len(prefix):]: v for k, v in rest["scalars"].items() if k.startswith(prefix)})
        if slots:
            state[index] = slots
    return {"state": state, "param_groups": rest["param_groups"]}
