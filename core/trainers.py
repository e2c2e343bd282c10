"""What each trainer trains: target layers, fresh trainable factors (LoRA and QR-LoRA), recipes, file contents.

Pure (torch only); the engine that runs a recipe is core/training.py, the ComfyUI side nodes/training.py.

Target presets pick model weight keys ('diffusion_model.<module>.weight'):

    preset                  weights
    attention projections   to_q / to_k / to_v / to_out.0 of every attn1 and attn2
    proj_out                every transformer's proj_out (Personalized Residuals' layers; on FLUX each double
                            block's image attention output img_attn.proj, core.blocks.residual_site)
    attention in blocks     the attention projections inside the listed blocks (B-LoRA's choice)
    all linear              every Linear and 1x1 conv weight of the UNet (what TrainLoraNode's LoRA reaches,
                            minus 3x3 convs and norms)

ConsisLoRA / B-LoRA block splits (content block, style block) per model layout are in BLOCK_SPLITS.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from .adapter import LowRank, is_pointwise_weight, new_lowrank
from .blocks import in_block, is_attention_projection, residual_site
from .qr_lora import qr_factorise, upper_triangular_mask
from .training import (Optimiser, Phase, Recipe, TrainState, optimiser_state_from_tensors,
                       optimiser_state_tensors)
from . import metadata as META


TARGET_PRESETS = {
    "attention projections": lambda key, shape: is_attention_projection(key),
    "proj_out": lambda key, shape: residual_site(key) is not None,
    "attention in blocks": lambda key, shape: is_attention_projection(key),
    "all linear": lambda key, shape: is_pointwise_weight(shape),
}
BLOCK_PRESET = "attention in blocks"

# (content blocks, style blocks), ComfyUI names. SDXL: B-LoRA's up_blocks.0.attentions.0 / .1. The world model
# (one-level SD1.5-shaped UNet), measured by bench/world/block_split.py on the retrained world (bench/RESULTS.md
# "Block split"): no block is shape alone there, so each part takes half of the four transformer blocks: content the
# two whose one-block adapters change the shape most (input_blocks.1.1, middle_block.1), style the other two. SD1.5
# (not measured: no SD1.5 weights here) keeps the split the first world suggested: its middle block, and its first
# up-block transformer output_blocks.3.1 (diffusers up_blocks.1.attentions.0).
# FLUX.1 (19 double + 38 single blocks): SplitFlux (Yang et al., CVPR 2026, arXiv 2511.15258) found by prompt
# replacement that the double blocks barely change the picture, the first ten single blocks (their blocks 20-29) set
# its content and the later ones (30-57) its style; it fine-tunes the single blocks only. Not measured here (no FLUX
# weights); on a FLUX with fewer single blocks (FLUX.2 klein, the tests' one-block FLUX) the blocks it lacks are dropped.
FLUX_SPLIT = "FLUX (SplitFlux)"
BLOCK_SPLITS = {
    "SDXL": (("output_blocks.0.1",), ("output_blocks.1.1",)),
    "world": (("input_blocks.1.1", "middle_block.1"), ("output_blocks.0.1", "output_blocks.1.1")),
    "SD1.5": (("middle_block.1",), ("output_blocks.3.1",)),
    FLUX_SPLIT: (tuple(f"single_blocks.{i}" for i in range(10)), tuple(f"single_blocks.{i}" for i in range(10, 38))),
}


def unet_weight_keys(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(s) for k, s in shapes.items() if k.startswith("diffusion_model.") and k.endswith(".weight")}


def select_targets(shapes: dict[str, tuple[int, ...]], preset: str, blocks: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{model weight key: shape} of the preset's layers (inside ``blocks`` when given); errors name what exists."""
    if preset not in TARGET_PRESETS:
        raise ValueError(f"targets must be one of {sorted(TARGET_PRESETS)}, got {preset!r}")
    unet = unet_weight_keys(shapes)
    if preset == BLOCK_PRESET and not blocks:
        raise ValueError(f"targets '{BLOCK_PRESET}' needs a block list, e.g. 'output_blocks.0.1, output_blocks.1.1'")
    chosen = {k: s for k, s in unet.items() if TARGET_PRESETS[preset](k, s)}
    if blocks:
        unknown = [b for b in blocks if not any(in_block(k, b) for k in chosen)]
        if unknown:
            having = sorted({k.split(".transformer_blocks")[0][len("diffusion_model."):] for k in chosen})
            raise ValueError(f"blocks {unknown} hold no '{preset}' layer in this model; blocks with one: {having}")
        chosen = {k: s for k, s in chosen.items() if any(in_block(k, b) for b in blocks)}
    if not chosen:
        raise ValueError(f"targets '{preset}' found no layer in this model")
    return chosen


def parse_blocks(text: str) -> tuple[str, ...]:
    """'output_blocks.0.1, output_blocks.1.1' (commas or new lines) -> ('output_blocks.0.1', 'output_blocks.1.1')."""
    return tuple(part.strip() for part in text.replace("\n", ",").split(",") if part.strip())


def trainable_lora(shape: tuple[int, ...], rank: int, alpha: float, generator: torch.Generator) -> LowRank:
    """Fresh LoRA factors (down ~ N(0, 1/in), up = 0, ΔW = alpha/rank · up down), gradients on. The rank is capped
    by the layer's size."""
    rank = min(rank, shape[0], int(torch.tensor(shape[1:]).prod()))
    factors = new_lowrank(shape, rank, generator)
    return LowRank(up=factors.up.requires_grad_(), down=factors.down.requires_grad_(), alpha=float(alpha))


def trainable_qr(weight: torch.Tensor, rank: int) -> tuple[LowRank, torch.Tensor]:
    """QR-LoRA factors of a base weight, ready to train: up = Q (frozen), down = ΔR = 0 (trainable), base_r = R
    (frozen, stored), and the gradient mask that keeps ΔR upper-triangular. Returns (factors, mask)."""
    rank = min(rank, weight.shape[0], weight[0].numel())
    qr = qr_factorise(weight.float(), rank)
    kernel = tuple(weight.shape[2:])
    q = qr.q.reshape(qr.q.shape[0], rank, *([1] * len(kernel)))
    base_r = qr.r.reshape(rank, *weight.shape[1:])
    mask = upper_triangular_mask(rank, qr.r.shape[1]).reshape(base_r.shape)
    delta_r = torch.zeros(base_r.shape, requires_grad=True)
    return LowRank(up=q, down=delta_r, alpha=None, extras={"base_r": base_r}), mask


def frozen_copy(modules: dict[str, LowRank]) -> dict[str, LowRank]:
    """Detached copies (no gradient) of trained factors: what an ADAPTER carries after training."""
    return {name: LowRank(up=f.up.detach().clone(), down=f.down.detach().clone(), alpha=f.alpha,
                          extras={k: v.detach().clone() for k, v in f.extras.items()}) for name, f in modules.items()}


def trainable_parameters(modules: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """{'<module>.up' / '<module>.down': tensor} for every factor that requires a gradient."""
    return {f"{name}.{part}": tensor for name, f in modules.items()
            for part, tensor in (("up", f.up), ("down", f.down)) if tensor.requires_grad}


def consislora_phases(mode: str, steps: int, switch_step: int, lr_epsilon: float, lr_x0: float) -> tuple[Phase, ...]:
    """ConsisLoRA's stepwise loss transition (ε loss at lr_epsilon until switch_step, then x0 loss at lr_x0);
    B-LoRA: ε loss throughout at lr_epsilon."""
    if mode == "b-lora" or switch_step >= steps:
        return (Phase(steps, "epsilon", lr_epsilon),)
    if switch_step <= 0:
        return (Phase(steps, "x0", lr_x0),)
    return (Phase(switch_step, "epsilon", lr_epsilon), Phase(steps, "x0", lr_x0))


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainingOptions:
    """The TRAINING_OPTIONS value: the knobs every trainer shares (the method's own numbers are its inputs)."""

    batch_size: int = 1
    accumulation: int = 1
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    grad_clip: float = 0.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    save_every: int = 0  # also write <file>_step<N> every N steps (0: only the final file)
    preview_prompt: str = ""  # sample this prompt every preview_every steps and at the end ("" : no previews)
    preview_every: int = 0
    preview_seed: int = 0
    precision: str = "fp32"  # of the saved adapter (fp32 resumes exactly)
    gradient_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)

    def optimiser(self) -> Optimiser:
        return Optimiser(name="adamw", weight_decay=self.weight_decay, grad_clip=self.grad_clip,
                         schedule=self.schedule, warmup_steps=self.warmup_steps, accumulation=self.accumulation)

    def recipe(self, phases: tuple[Phase, ...], seed: int, noise_offset: float | None = None) -> Recipe:
        offset = self.noise_offset if noise_offset is None else noise_offset
        return Recipe(phases, self.batch_size, seed, offset, self.min_snr_gamma, self.optimiser())


# Each method's official settings, used when no Training Options node is connected (methods.md, training.md).
METHOD_OPTIONS = {
    "lora": TrainingOptions(),
    # ConsisLoRA: AdamW, weight decay 1e-4, gradient clipping at 1.0 (official code); B-LoRA trains the same way
    "consislora": TrainingOptions(weight_decay=1e-4, grad_clip=1.0),
    # QR-LoRA: batch 1 x gradient accumulation 4, AdamW
    "qr-lora": TrainingOptions(accumulation=4),
    # B4M: batch 1 x gradient accumulation 4, AdamW weight decay 1e-2, gradient norm clipped at 1.0 (official scripts)
    "b4m": TrainingOptions(accumulation=4, weight_decay=1e-2, grad_clip=1.0),
    # Personalized Residuals: batch 4 (the paper; its optimiser settings are not published: AdamW's usual decay)
    "personalized-residuals": TrainingOptions(batch_size=4),
}

RESIDUAL_CAPTION = "a photo of a {identifier} {class_word}"


def residual_captions(template: str, identifier: str, class_word: str, count: int) -> tuple[str, ...]:
    """Personalized Residuals' captions, 'a photo of a V* <class>', one per image."""
    if not identifier.strip() or not class_word.strip():
        raise ValueError("identifier and class_word must both be given (e.g. 'sks' and 'dog')")
    if "{identifier}" not in template:
        raise ValueError(f"caption {template!r} has no {{identifier}}: the residual must learn its word")
    caption = template.replace("{identifier}", identifier.strip()).replace("{class_word}", class_word.strip())
    return (caption,) * count


def trainable_token_rows(token_ids: tuple[int, ...], vocab: int, width: int) -> tuple[LowRank, torch.Tensor]:
    """The change of some rows of a (vocab, width) token-embedding matrix as exact low-rank factors, ready to train:
    up (vocab, k) holds one-hot columns at the token ids (frozen), down (k, width) the rows' changes (zero at the start,
    trainable); ΔW = up @ down adds down[j] to row token_ids[j] and leaves every other row as it is. Returns (factors,
    the gradient mask that freezes up)."""
    if not token_ids or len(set(token_ids)) != len(token_ids) or not all(0 <= t < vocab for t in token_ids):
        raise ValueError(f"token ids {list(token_ids)} must be distinct and within the vocabulary of {vocab}")
    up = torch.zeros(vocab, len(token_ids))
    up[list(token_ids), torch.arange(len(token_ids))] = 1.0
    factors = LowRank(up=up, down=torch.zeros(len(token_ids), width, requires_grad=True), alpha=None)
    return factors, torch.zeros_like(up)


def weights_hash(weights: dict[str, torch.Tensor]) -> str:
    """sha256 (16 hex digits) of weights in float32, keys sorted: the base model's fingerprint in a saved file."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# -- training state files (the optimiser state beside a saved adapter) --------------------------------------

STATE_KIND = META.STATE_KIND


def state_file_contents(state: TrainState, names: list[str], recipe: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a training-state file: optimiser tensors per parameter; step, losses, the optimiser's
    other values and the recipe as JSON metadata (no pickle)."""
    tensors, rest = optimiser_state_tensors(state.optimiser, names)
    metadata = {META.KIND: STATE_KIND, META.STEP: str(state.step), META.LOSSES: json.dumps(state.losses),
                META.PARAMETERS: json.dumps(names), META.OPTIMISER: json.dumps(rest), META.RECIPE: json.dumps(recipe)}
    return tensors, metadata


def state_from_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str,
                    names: list[str]) -> tuple[TrainState, dict]:
    """The TrainState and recipe of a training-state file; refuses a file made for other parameters."""
    if metadata.get(META.KIND) != STATE_KIND:
        raise ValueError(f"{source}: not a training-state file (no csa.kind={STATE_KIND} metadata)")
    saved = json.loads(metadata[META.PARAMETERS])
    if saved != names:
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise ValueError(f"{source}: the saved optimiser state is for other parameters (missing {missing[:3]}, "
                         f"extra {extra[:3]}); resume with the same targets, rank and method")
    optimiser = optimiser_state_from_tensors(tensors, json.loads(metadata[META.OPTIMISER]), names)
    return (TrainState(int(metadata[META.STEP]), json.loads(metadata[META.LOSSES]), optimiser),
            json.loads(metadata[META.RECIPE]))
