"""Training inside the graph: Training Images, Training Options, and the LoRA, ConsisLoRA / B-LoRA and QR-LoRA
trainers. Every trainer runs on the pack's one engine (core/training.py) through nodes/training.py, and outputs
an ADAPTER, its loss curve, preview images and, when given a filename, the saved file's path."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..core.adapter import ROLES
from ..core.blocks import BLOCK_SPLIT_KEY, in_block
from ..core.layouts import generic_module_name
from ..core.trainers import (BLOCK_PRESET, BLOCK_SPLITS, FLUX_SPLIT, METHOD_OPTIONS, PRECISIONS, TARGET_PRESETS,
                             TrainingOptions, consislora_phases, parse_blocks, select_targets, trainable_lora, trainable_qr)
from ..core.training import SCHEDULES, TARGETS, Phase
from ..core.training_data import training_latents
from . import comfy_compat as cc
from .common import PackNode, schema
from .sockets import AdapterSocket, TrainingDataSocket, TrainingOptionsSocket
from .training import (SEED_MAX, Job, Stage, gather_training_images, node_output, outputs, run_training,
                       saving_inputs, shared_inputs)

def lora_modules(shapes: dict[str, tuple], rank: int, alpha: float, seed: int):
    """Fresh LoRA factors on every target, and a function that draws one module afresh (same generator)."""
    generator = torch.Generator().manual_seed(seed)
    by_name = {generic_module_name(key): shape for key, shape in shapes.items()}
    modules = {name: trainable_lora(shape, rank, alpha, generator) for name, shape in by_name.items()}
    return modules, lambda name: trainable_lora(by_name[name], rank, alpha, generator)


class TrainingImagesNode(PackNode):
    """Training images with captions: an IMAGE batch (captions one per line, or one line for all) and / or a folder
    inside the input directory whose images have same-named .txt captions (kohya's convention). Images are resized
    and centre-cropped to the training size; {trigger} in a caption becomes the trigger word."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainingImages", "Training Images", inputs=[
                io.Image.Input("images", optional=True, tooltip="Training images (any size; cropped to a square)."),
                io.String.Input("captions", multiline=True, default="a {trigger}",
                                tooltip="One caption per image, one per line, or one line for all (also the caption "
                                        "of folder images without a .txt)."),
                io.String.Input("image_folder", default="", tooltip="Optional folder inside ComfyUI's input directory: "
                                "images with same-named .txt captions."),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="Times each image counts per epoch."),
                io.String.Input("trigger_word", default="", tooltip="Replaces {trigger} in every caption."),
                io.Int.Input("resolution", default=512, min=8, max=4096, step=8,
                             tooltip="Square training size in pixels (SD1.5 512, SDXL 1024, the world model 64)."),
            ],
            outputs=[TrainingDataSocket.Output(display_name="data", tooltip="Images and captions for a trainer.")],
        )

    @classmethod
    def execute(cls, captions: str, image_folder: str, repeats: int, trigger_word: str, resolution: int,
                images=None) -> io.NodeOutput:
        return io.NodeOutput(gather_training_images(images, captions, image_folder, repeats, trigger_word, resolution))


class TrainingLatentsNode(PackNode):
    """Training data as ComfyUI's Train LoRA takes it: latents (VAE Encode, or any LATENT) with their conditioning,
    encoded outside the trainer, so the trainer needs no text encoder or VAE loaded (FLUX's T5-XXL stays out of
    memory). One conditioning for all latents, or one per latent in order (Conditioning Combine keeps the order)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainingLatents", "Training Latents", inputs=[
                io.Latent.Input("latents", tooltip="The training pictures' latents (a batch)."),
                io.Conditioning.Input("conditioning", tooltip="Their conditioning: one entry for all, or one per "
                                                              "latent."),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="What the conditioning says, recorded in the saved file (one line for all, or "
                                        "one per latent); {trigger} becomes the trigger word."),
                io.Int.Input("repeats", default=1, min=1, max=1000, tooltip="Times each latent counts per epoch."),
                io.String.Input("trigger_word", default="", tooltip="Recorded in the file; replaces {trigger}."),
            ],
            outputs=[TrainingDataSocket.Output(display_name="data", tooltip="Latents and conditioning for a trainer.")],
        )

    @classmethod
    def execute(cls, latents: dict, conditioning: list, captions: str, repeats: int, trigger_word: str) -> io.NodeOutput:
        return io.NodeOutput(training_latents(latents["samples"], conditioning, captions, repeats, trigger_word))


class TrainingOptionsNode(PackNode):
    """Settings every trainer shares. Connect it to override a trainer's method defaults (unconnected, each trainer
    uses its method's official settings)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        d = TrainingOptions()
        return schema(cls, "TrainingOptions", "Training Options", inputs=[
                io.Int.Input("batch_size", default=d.batch_size, min=1, max=256, tooltip="Images per micro-batch."),
                io.Int.Input("accumulation", default=d.accumulation, min=1, max=256,
                             tooltip="Micro-batches per optimiser step (gradient accumulation)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default=d.schedule,
                               tooltip="Learning-rate factor over the run: constant, cosine to 0, or linear to 0."),
                io.Int.Input("warmup_steps", default=d.warmup_steps, min=0, max=100000, tooltip="Linear warm-up steps."),
                io.Float.Input("weight_decay", default=d.weight_decay, min=0.0, max=1.0, step=1e-4, tooltip="AdamW decay."),
                io.Float.Input("grad_clip", default=d.grad_clip, min=0.0, max=100.0, step=0.1,
                               tooltip="Clip the gradient norm to this (0: off)."),
                io.Float.Input("min_snr_gamma", default=d.min_snr_gamma, min=0.0, max=100.0, step=0.5,
                               tooltip="Min-SNR-γ loss weighting (0: off; 5 is usual)."),
                io.Float.Input("noise_offset", default=d.noise_offset, min=0.0, max=1.0, step=0.01,
                               tooltip="Noise offset (per-channel constant added to the noise)."),
                io.Int.Input("save_every", default=d.save_every, min=0, max=100000,
                             tooltip="Also save <filename>_step<N> with its optimiser state every N steps (0: off)."),
                io.String.Input("preview_prompt", default=d.preview_prompt,
                                tooltip="Sample this prompt during and after training ('': no previews)."),
                io.Int.Input("preview_every", default=d.preview_every, min=0, max=100000,
                             tooltip="Preview every N steps (0: only at the end)."),
                io.Int.Input("preview_seed", default=d.preview_seed, min=0, max=SEED_MAX, tooltip="The previews' seed."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=d.precision,
                               tooltip="Saved adapter precision (fp32 resumes exactly)."),
                io.Boolean.Input("gradient_checkpointing", default=d.gradient_checkpointing, optional=True,
                                 tooltip="Recompute each block's activations during the backward pass: less memory "
                                         "for large models (FLUX), slower steps; the same result."),
            ],
            outputs=[TrainingOptionsSocket.Output(display_name="options", tooltip="Connect to a trainer.")],
        )

    @classmethod
    def execute(cls, **options) -> io.NodeOutput:
        return io.NodeOutput(TrainingOptions(**options))


class TrainAdapter(PackNode):
    """Train a LoRA on chosen layers: the baseline every method is compared with. Targets: attention projections,
    transformer proj_out, the attention of a block list, or every linear layer; ε, x0 or v loss; AdamW."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainAdapter", "Train Adapter (LoRA)", inputs=[
                *shared_inputs(),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="attention projections",
                               tooltip="Which layers get a LoRA."),
                io.String.Input("blocks", default="", tooltip=f"Blocks for '{BLOCK_PRESET}' (or to restrict any preset), "
                                "e.g. 'output_blocks.0.1, output_blocks.1.1'."),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.5, tooltip="ΔW = alpha/rank · up down."),
                io.Int.Input("steps", default=500, min=1, max=1000000, tooltip="Optimiser steps of the whole run."),
                io.Float.Input("lr", default=1e-4, min=1e-8, max=1.0, step=1e-5, tooltip="Learning rate."),
                io.Combo.Input("loss", options=list(TARGETS), default="epsilon",
                               tooltip="Loss target: epsilon (noise), x0 (clean latent) or v."),
                io.Combo.Input("role", options=list(ROLES), default="generic", tooltip="The adapter's role."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of init, batches, noise, timesteps."),
                *saving_inputs(),
            ],
            outputs=outputs(),
        )

    @classmethod
    def execute(cls, model, data, targets: str, blocks: str, rank: int, alpha: float, steps: int, lr: float,
                loss: str, role: str, seed: int, filename: str, overwrite: bool, resume_from: str,
                options: TrainingOptions | None = None, clip=None, vae=None) -> io.NodeOutput:
        options = options or METHOD_OPTIONS["lora"]
        shapes = select_targets(cc.weight_shapes(model), targets, parse_blocks(blocks))
        modules, fresh = lora_modules(shapes, rank, alpha, seed)
        stage = Stage(options.recipe((Phase(steps, loss, lr),), seed), tuple(modules))
        settings = {"targets": targets, "blocks": blocks, "rank": rank, "alpha": alpha, "steps": steps, "lr": lr,
                    "loss": loss, "seed": seed}
        job = Job("Train Adapter (LoRA)", "lora", role, modules, fresh, (stage,), options, settings)
        return node_output(run_training(model, vae, clip, data, job, filename, overwrite, resume_from))


class TrainQRLoRA(PackNode):
    """Train a QR-LoRA: per target weight, Q and R from its rank-r SVD + QR (both frozen, the residual stays in the
    model) and a zero-initialised ΔR kept upper-triangular trains. The result (with base_r) merges exactly in QR
    Merge with any other QR-LoRA trained on the same base."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainQRLoRA", "Train QR-LoRA", inputs=[
                *shared_inputs(),
                io.Combo.Input("targets", options=list(TARGET_PRESETS), default="attention projections",
                               tooltip="Which layers are adapted."),
                io.String.Input("blocks", default="", tooltip=f"Blocks for '{BLOCK_PRESET}' (or to restrict any preset)."),
                io.Int.Input("rank", default=64, min=1, max=1024, tooltip="r: columns of Q (official: 64)."),
                io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="Optimiser steps (official: 1000)."),
                io.Float.Input("lr", default=1e-4, min=1e-8, max=1.0, step=1e-5, tooltip="Learning rate (official 1e-4)."),
                io.Combo.Input("loss", options=list(TARGETS), default="epsilon", tooltip="Loss target."),
                io.Combo.Input("role", options=list(ROLES), default="generic", tooltip="The adapter's role."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of batches, noise and timesteps."),
                *saving_inputs(),
            ],
            outputs=outputs(),
        )

    @classmethod
    def execute(cls, model, data, targets: str, blocks: str, rank: int, steps: int, lr: float, loss: str,
                role: str, seed: int, filename: str, overwrite: bool, resume_from: str,
                options: TrainingOptions | None = None, clip=None, vae=None) -> io.NodeOutput:
        options = options or METHOD_OPTIONS["qr-lora"]
        shapes = select_targets(cc.weight_shapes(model), targets, parse_blocks(blocks))
        weights = cc.base_weights(model, shapes)
        factors = {generic_module_name(key): trainable_qr(weight, rank) for key, weight in weights.items()}
        modules = {name: f for name, (f, _) in factors.items()}
        stage = Stage(options.recipe((Phase(steps, loss, lr),), seed), tuple(modules))
        settings = {"targets": targets, "blocks": blocks, "rank": rank, "steps": steps, "lr": lr, "loss": loss,
                    "seed": seed}
        job = Job("Train QR-LoRA", "qr-lora", role, modules, lambda name: trainable_qr(weights[name + ".weight"], rank)[0],
                  (stage,), options, settings, masks={f"{name}.down": mask for name, (_, mask) in factors.items()},
                  trained_parts=("down",), qr_form=True)
        return node_output(run_training(model, vae, clip, data, job, filename, overwrite, resume_from))


CONSISLORA_MODES = {"content": "content", "style": "style", "b-lora": "generic"}  # mode -> role
SPLIT_PRESETS = ("auto", *BLOCK_SPLITS, "custom")


def resolve_block_split(model, preset: str, content_blocks: str, style_blocks: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(content blocks, style blocks): a preset, 'auto' (FLUX's for a model with FLUX single blocks, SDXL for other
    pooled models, else SD1.5 when its blocks exist, else the world model's one-level split) or the custom lists.
    FLUX's split keeps the single blocks the model has; a part left with none is refused, naming what exists."""
    if preset == "custom":
        return parse_blocks(content_blocks), parse_blocks(style_blocks)
    keys = [k for k in cc.weight_shapes(model) if k.startswith("diffusion_model.")]
    has = lambda block: any(in_block(k, block) for k in keys)  # noqa: E731
    if preset == "auto":
        preset = FLUX_SPLIT if has("single_blocks.0") else "SDXL" if cc.has_pooled_conditioning(model) else (
            "SD1.5" if all(has(b) for part in BLOCK_SPLITS["SD1.5"] for b in part) else "world")
    if preset != FLUX_SPLIT:
        return BLOCK_SPLITS[preset]
    kept = tuple(tuple(b for b in part if has(b)) for part in BLOCK_SPLITS[preset])
    for name, part in zip(("content", "style"), kept):
        if not part:
            singles = sorted({k.split(".")[2] for k in keys if k.startswith("diffusion_model.single_blocks.")}, key=int)
            raise ValueError(f"block_split '{preset}': this model has none of its {name} blocks "
                             f"({BLOCK_SPLITS[preset][0 if name == 'content' else 1][0]} ...); its single blocks are "
                             f"{', '.join(singles) or 'none'}: choose 'custom' and name the blocks")
    return kept


def consislora_stages(mode: str, options: TrainingOptions, seed: int, modules: dict, style_names: tuple[str, ...],
                      s: dict) -> tuple[Stage, ...]:
    """content / b-lora: one stage on both blocks. style: that stage on the style images, then a fresh style-block
    adapter trained with x0 loss and noise offset while the content block stays frozen."""
    phases = consislora_phases(mode, s["steps"], s["switch_step"], s["lr_epsilon"], s["lr_x0"])
    first = Stage(options.recipe(phases, seed), tuple(modules))
    if mode != "style":
        return (first,)
    second = options.recipe((Phase(s["style_steps"], "x0", s["style_lr"]),), seed + 1, s["style_noise_offset"])
    return first, Stage(second, style_names, fresh=style_names)


class TrainConsisLoRA(PackNode):
    """Train ConsisLoRA (or B-LoRA) adapters on the content and style blocks. content: ε loss, then a hard switch to
    x0 loss. style: the same on the style images, then the content block frozen and a fresh style-block adapter
    trained with x0 loss and noise offset. B-LoRA: ε loss throughout. Outputs the whole adapter and its two blocks
    (the Content-Style Guider's slots)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainConsisLoRA", "Train ConsisLoRA", inputs=[
                *shared_inputs(),
                io.Combo.Input("mode", options=list(CONSISLORA_MODES), default="content",
                               tooltip="content image, style image (two stages), or B-LoRA (ε loss only)."),
                io.Combo.Input("block_split", options=list(SPLIT_PRESETS), default="auto",
                               tooltip="Content / style blocks. SDXL: output_blocks.0.1 / 1.1 (B-LoRA's); world: "
                                       "input_blocks.1.1 + middle_block.1 / output_blocks.0.1 + 1.1 (measured, "
                                       "bench/RESULTS.md); SD1.5: middle_block.1 / output_blocks.3.1 (unmeasured). "
                                       "Recorded in the file."),
                io.String.Input("content_blocks", default="", tooltip="Content blocks for block_split 'custom'."),
                io.String.Input("style_blocks", default="", tooltip="Style blocks for block_split 'custom'."),
                io.Int.Input("rank", default=64, min=1, max=1024, tooltip="LoRA rank (official: 64)."),
                io.Float.Input("alpha", default=64.0, min=0.01, max=1024.0, step=0.5, tooltip="LoRA alpha (official: 64)."),
                io.Int.Input("steps", default=1500, min=1, max=1000000,
                             tooltip="Steps of the content stage (official 1500; B-LoRA 1000)."),
                io.Int.Input("switch_step", default=500, min=0, max=1000000,
                             tooltip="Step of the hard switch from ε to x0 loss (official: 500)."),
                io.Float.Input("lr_epsilon", default=2e-4, min=1e-8, max=1.0, step=1e-5,
                               tooltip="Learning rate with the ε loss (official 2e-4; B-LoRA's is 5e-5)."),
                io.Float.Input("lr_x0", default=1e-4, min=1e-8, max=1.0, step=1e-5,
                               tooltip="Learning rate with the x0 loss (official 1e-4)."),
                io.Int.Input("style_steps", default=1000, min=1, max=1000000,
                             tooltip="Style mode, stage 2: steps of the fresh style-block adapter (official 1000)."),
                io.Float.Input("style_lr", default=1e-4, min=1e-8, max=1.0, step=1e-5, tooltip="Style stage 2 lr."),
                io.Float.Input("style_noise_offset", default=0.03, min=0.0, max=1.0, step=0.01,
                               tooltip="Style stage 2 noise offset (official 0.03)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of init, batches, noise, timesteps."),
                *saving_inputs(),
            ],
            outputs=outputs([
                AdapterSocket.Output(display_name="content_block", tooltip="Only the content block (role content)."),
                AdapterSocket.Output(display_name="style_block", tooltip="Only the style block (role style)."),
            ]),
        )

    @classmethod
    def execute(cls, model, data, mode: str, block_split: str, content_blocks: str, style_blocks: str,
                rank: int, alpha: float, seed: int, filename: str, overwrite: bool, resume_from: str,
                options: TrainingOptions | None = None, clip=None, vae=None, **settings) -> io.NodeOutput:
        options = options or METHOD_OPTIONS["consislora"]
        content, style = resolve_block_split(model, block_split, content_blocks, style_blocks)
        shapes = select_targets(cc.weight_shapes(model), BLOCK_PRESET, content + style)
        modules, fresh = lora_modules(shapes, rank, alpha, seed)
        style_names = tuple(n for n in modules if any(in_block(n, b) for b in style))
        stages = consislora_stages(mode, options, seed, modules, style_names, settings)
        record = {**settings, "mode": mode, "content_blocks": content, "style_blocks": style, "rank": rank,
                  "alpha": alpha, "seed": seed}
        method = "b-lora" if mode == "b-lora" else "consislora"
        split = {BLOCK_SPLIT_KEY: json.dumps({"content": content, "style": style})}
        job = Job("Train ConsisLoRA", method, CONSISLORA_MODES[mode], modules, fresh, stages, options, record,
                  metadata=split)
        result = run_training(model, vae, clip, data, job, filename, overwrite, resume_from)
        parts = {role: [n for n in result.adapter.modules if any(in_block(n, b) for b in blocks)]
                 for role, blocks in (("content", content), ("style", style))}
        return node_output(result, *[result.adapter.subset(names).replace(role=role) for role, names in parts.items()])

