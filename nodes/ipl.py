"""IPL (image-specific prompt learning), the whole method: Image to Prompt Vectors (inference), Train Prompt
Mapper (stage 1) and Zero-shot Adapt (stage 2, diffusion form), with the prompt-vector token splicing.

Prompt vectors enter at the text encoders' input embeddings, one token slot each, through ComfyUI's
textual-inversion path. Training differentiates through the text and image encoders with the out-of-place
forwards of nodes/clip_features.py.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter, trainable_lowrank
from ..core.adapter_file import path_inside
from ..core.blocks import is_attention_projection
from ..core.ipl import (ADAM, TEMPLATES, LatentMapper, directional_loss, load_mapper, replace_marker, save_mapper,
                        train_mapper)
from ..core.layouts import generic_module_name
from ..core.trainers import frozen_copy, trainable_parameters
from ..core.training import optimise
from . import comfy_compat as cc
from .clip_features import (clip_vision_embeds, clip_vision_embeds_with_grad, clip_vision_width, projected_text_features,
                            projection_width, text_encoders, token_widths, vae_decode_with_grad)
from .common import PackNode, schema
from .plots import loss_plot
from .runtime_adapters import ACTIVE_KEY, install_switched_adapters
from .sockets import AdapterSocket
from .training import grad_enabled, make_autograd_safe, read_image_folder, vae_encode
from ..core import metadata as META

MARKER = "iplplaceholdervectors"
ADAPTED = "ipl"


# -- text encoders: prompt vectors in the token stream ------------------------------------------------

def insert_prompt_vectors(clip, template: str, marker: str, vectors: dict) -> dict:
    """Tokens of ``template`` with ``marker`` replaced by one entry per vector, for every text encoder.

    ``vectors[key]`` is (n_ctx, width) for encoder ``key``. Each vector takes one token slot (ComfyUI's
    textual-inversion path); trailing padding is dropped so every chunk keeps its length.
    """
    if template.count("{}") != 1:
        raise ValueError(f"the template {template!r} must have exactly one {{}} placeholder for the prompt vectors; "
                         f"it has {template.count('{}')}")
    tokens = clip.tokenize(template.replace("{}", marker))
    empty = clip.tokenize("")
    marker_tokens = clip.tokenize(marker)
    for key, chunks in tokens.items():
        if key not in vectors:
            raise ValueError(f"the mapper has vectors for text encoders {sorted(vectors)}, this CLIP has {sorted(tokens)}")
        special = {entry[0] for entry in empty[key][0]}
        pad = empty[key][0][-1][0]
        ids = [e[0] for e in marker_tokens[key][0] if e[0] not in special]
        replaced = [replace_marker(chunk, ids, vectors[key], pad, template) for chunk in chunks]
        if all(new is old for new, old in zip(replaced, chunks)):
            raise ValueError(f"the tokenizer split the {{}} of the template {template!r} so the prompt vectors found "
                             f"no place; put spaces around {{}}")
        tokens[key] = replaced
    return tokens


def encode_tokens(clip, tokens) -> tuple:
    """(cond (1, T, D), pooled) of ComfyUI's own encoding of these tokens."""
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")


# -- mappers and prompts ---------------------------------------------------------------------------------

def check_mapper_fits(mapper: LatentMapper, clip_vision, clip, name: str) -> None:
    vision, widths = clip_vision_width(clip_vision), token_widths(clip)
    if mapper.in_dim != vision:
        raise ValueError(f"{name}: the mapper takes {mapper.in_dim}-wide image embeddings, this CLIP_VISION gives {vision}")
    if mapper.token_dims != widths:
        raise ValueError(f"{name}: the mapper makes vectors for text encoders {mapper.token_dims}, this CLIP has {widths}")


def conditioning_with_vectors(clip, template: str, per_image: list[dict[str, torch.Tensor]]) -> list:
    """One conditioning entry holding a batch: row b is the template with image b's vectors."""
    conds, pooled = [], []
    for vectors in per_image:
        cond, pool = encode_tokens(clip, insert_prompt_vectors(clip, template, MARKER, vectors))
        conds.append(cond)
        pooled.append(pool)
    extras = {"pooled_output": torch.cat(pooled)} if pooled[0] is not None else {}
    return [[torch.cat(conds), extras]]


def paired_encoder(clip, clip_vision) -> str:
    """The text encoder whose projected features live in the CLIP vision model's space (same width)."""
    width = clip_vision_width(clip_vision)
    keys = [k for k in text_encoders(clip) if projection_width(clip, k) == width]
    if not keys:
        widths = {k: projection_width(clip, k) for k in text_encoders(clip)}
        raise ValueError(f"no text encoder of this CLIP projects to the CLIP vision width {width} (they give {widths}); "
                         f"use the text encoder that was trained with this vision model")
    return keys[0]


def source_embeddings(clip_vision, images, image_folder: str) -> torch.Tensor:
    batches = ([images] if images is not None else []) + ([image for image, _ in read_image_folder(image_folder)] if image_folder else [])
    if not batches:
        raise ValueError("give source images, an image_folder, or both")
    return torch.cat([clip_vision_embeds(clip_vision, b) for b in batches])


def vector_prompts(clip, mapper: LatentMapper, vectors: torch.Tensor, label: str) -> list[dict]:
    """Tokens of [SOS][V1..Vn][label][EOS] for each row of vectors (every text encoder)."""
    split = mapper.split(vectors)
    return [insert_prompt_vectors(clip, "{} " + label, MARKER, {k: v[row] for k, v in split.items()})
            for row in range(vectors.shape[0])]


def prompt_features(clip, key: str, mapper: LatentMapper, vectors: torch.Tensor, label: str) -> torch.Tensor:
    """(b, P) projected features of each row's prompt through the frozen text encoder, in one batch."""
    return projected_text_features(clip, key, [p[key] for p in vector_prompts(clip, mapper, vectors, label)])


def template_features(clip, key: str, label: str) -> torch.Tensor:
    with torch.no_grad():
        return projected_text_features(clip, key, [clip.tokenize(t.format(label))[key] for t in TEMPLATES])


# -- nodes -----------------------------------------------------------------------------------------------

class ImageToPromptVectors(PackNode):
    """IPL: a latent mapper turns each image's CLIP vision embedding into n_ctx prompt vectors that replace {} in the
    template at the text encoders' input embeddings (like textual inversion). A batch of images gives a batch of
    conditionings."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ImageToPromptVectors", "Image to Prompt Vectors", inputs=[
                io.Image.Input("image", tooltip="One image or a batch; each gets its own prompt vectors."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the mapper was trained with."),
                io.Combo.Input("mapper_name", options=cc.mapper_file_names(),
                               tooltip=f"A mapper file from models/{cc.MAPPER_FOLDER} (made by Train Prompt Mapper)."),
                io.Clip.Input("clip", tooltip="The text encoder(s) that encode the prompt."),
                io.String.Input("template", default="a {} photo of a dog",
                                tooltip="The prompt; {} is replaced by the image's prompt vectors."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="Batch of conditionings, one row per image.")],
        )

    @classmethod
    def execute(cls, image, clip_vision, mapper_name: str, clip, template: str) -> io.NodeOutput:
        mapper, _ = load_mapper(cc.mapper_file_path(mapper_name))
        check_mapper_fits(mapper, clip_vision, clip, mapper_name)
        with torch.no_grad():
            vectors = mapper.split(mapper(clip_vision_embeds(clip_vision, image)))
        per_image = [{key: v[b] for key, v in vectors.items()} for b in range(image.shape[0])]
        return io.NodeOutput(conditioning_with_vectors(clip, template, per_image))


class TrainPromptMapper(PackNode):
    """IPL stage 1: train a latent mapper from source images so each image's prompt vectors plus the source label match
    the image in CLIP space (symmetric contrastive loss), with a domain regulariser toward the target label. Saves
    to models/prompt_mappers."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainPromptMapper", "Train Prompt Mapper", inputs=[
                io.Image.Input("images", optional=True, tooltip="Source images (at least 2 with the folder)."),
                io.String.Input("image_folder", default="", tooltip="Optional folder of source images inside ComfyUI's input directory."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision model; its embeddings feed the mapper."),
                io.Clip.Input("clip", tooltip="Text encoder with a text projection in the same CLIP space."),
                io.String.Input("source_label", default="photo", tooltip="Class label of the source domain."),
                io.String.Input("target_label", default="sketch", tooltip="Class label of the target domain."),
                io.Int.Input("iterations", default=300, min=1, max=100000, tooltip="Optimiser steps (paper: 300)."),
                io.Float.Input("lr", default=0.05, min=1e-6, max=1.0, step=1e-4, tooltip="Adam learning rate (paper: 0.05)."),
                io.Int.Input("batch_size", default=32, min=2, max=1024, tooltip="Images per step (paper: 32)."),
                io.Int.Input("n_ctx", default=4, min=1, max=16, tooltip="Prompt vectors per image (paper: 4)."),
                io.Float.Input("regularizer_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the domain regulariser."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the mapper's init and batches."),
                io.String.Input("filename", default="ipl_mapper", tooltip="File name in models/prompt_mappers."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing mapper file."),
            ],
            outputs=[
                io.String.Output(display_name="mapper_name", tooltip="The saved mapper's name (for Image to Prompt Vectors)."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, clip_vision, clip, source_label: str, target_label: str, iterations: int, lr: float,
                batch_size: int, n_ctx: int, regularizer_weight: float, seed: int, filename: str, overwrite: bool,
                image_folder: str = "", images=None) -> io.NodeOutput:
        target = path_inside(cc.mapper_save_root(), "", filename)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; choose another filename or allow overwriting")
        key = paired_encoder(clip, clip_vision)
        make_autograd_safe(*cc.torch_modules(clip=clip))
        with grad_enabled():
            embeds = source_embeddings(clip_vision, images, image_folder).clone()
            with torch.random.fork_rng(devices=[]):  # seed the mapper's init without touching the server's generator
                torch.manual_seed(seed)
                mapper = LatentMapper(embeds.shape[1], n_ctx, token_widths(clip))
            losses = train_mapper(mapper, embeds, lambda v, label: prompt_features(clip, key, mapper, v, label),
                                  source_label, target_label, template_features(clip, key, target_label), iterations,
                                  lr, batch_size, seed, regularizer_weight, on_step=cc.progress_steps(iterations))
        save_mapper(mapper, target, {META.SOURCE_LABEL: source_label, META.TARGET_LABEL: target_label,
                                     META.FINAL_LOSS: f"{losses[-1]:.6f}"}, overwrite=overwrite)
        return io.NodeOutput(target.name, loss_plot(losses, title="Prompt mapper loss")[None])


def attention_targets(model) -> dict[str, tuple[int, ...]]:
    """Every attention projection of the UNet: what Zero-shot Adapt trains."""
    return {k: s for k, s in cc.weight_shapes(model).items() if is_attention_projection(k)}


class PromptPairs:
    """Per source image: its source-prompt conditioning and the projected features of its source/target prompts."""

    def __init__(self, clip, key: str, mapper: LatentMapper, embeds: torch.Tensor, source: str, target: str):
        with torch.no_grad():
            vectors = mapper(embeds)
            source_prompts = vector_prompts(clip, mapper, vectors, source)
            self.conds = [encode_tokens(clip, tokens)[0] for tokens in source_prompts]
            self.source_features = projected_text_features(clip, key, [p[key] for p in source_prompts])[:, None]
            target_prompts = vector_prompts(clip, mapper, vectors, target)
            self.target_features = projected_text_features(clip, key, [p[key] for p in target_prompts])[:, None]


def adaptation_step(model, vae, clip_vision, latent, cond, pairs: PromptPairs, index: int, sigma: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Directional loss of one image: the adapted UNet's x0 against the frozen one's, from the same noisy latent."""
    noisy = latent + sigma * torch.randn(latent.shape, generator=generator)
    with torch.no_grad():
        source = cc.denoised(model, noisy, sigma, cond, {ACTIVE_KEY: frozenset()})
        source_embed = clip_vision_embeds_with_grad(
            clip_vision, vae_decode_with_grad(vae, cc.from_model_space(model, source)))
    adapted = cc.denoised(model, noisy, sigma, cond, {ACTIVE_KEY: frozenset({ADAPTED})})
    adapted_embed = clip_vision_embeds_with_grad(clip_vision, vae_decode_with_grad(vae, cc.from_model_space(model, adapted)))
    return directional_loss(source_embed, adapted_embed, pairs.source_features[index], pairs.target_features[index])


class ZeroShotAdapt(PackNode):
    """IPL stage 2 (diffusion form): train a LoRA on the UNet's attention so that, image by image, the CLIP image
    change from the frozen to the adapted model's prediction follows the change from the image's source prompt to
    its target prompt (directional loss). SD1.x/SD2.x UNets."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ZeroShotAdapt", "Zero-shot Adapt", inputs=[
                io.Model.Input("model", tooltip="The source model (frozen; the adapter is trained beside it)."),
                io.Vae.Input("vae", tooltip="Decodes predictions to images for CLIP."),
                io.Clip.Input("clip", tooltip="Text encoder with a text projection in the CLIP vision space."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model of the mapper."),
                io.Combo.Input("mapper_name", options=cc.mapper_file_names(), tooltip="A mapper from Train Prompt Mapper."),
                io.Image.Input("images", tooltip="Source images (one prompt pair each)."),
                io.String.Input("source_label", default="photo", tooltip="Source class label."),
                io.String.Input("target_label", default="sketch", tooltip="Target class label."),
                io.Int.Input("iterations", default=200, min=1, max=100000, tooltip="Optimiser steps."),
                io.Float.Input("lr", default=1e-3, min=1e-7, max=1.0, step=1e-5, tooltip="Adam learning rate."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="LoRA rank on every attention projection."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of init, noise and timesteps."),
            ],
            outputs=[
                AdapterSocket.Output(display_name="adapter", tooltip="The target-domain adapter (method ipl-zero-shot)."),
                io.Image.Output(display_name="loss_curve", tooltip="Directional loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, clip, clip_vision, mapper_name: str, images, source_label: str, target_label: str,
                iterations: int, lr: float, rank: int, seed: int) -> io.NodeOutput:
        if not cc.is_unet(model):  # IPL's prompt vectors live in CLIP-L's token space; FLUX / SD3 read T5's too
            raise ValueError(f"Zero-shot Adapt supports UNets conditioned on CLIP text tokens only (SD1.x / SD2.x); "
                             f"this model is {cc.model_name(model)}, conditioned through T5 as well, where IPL's "
                             f"CLIP-space prompt vectors have no place")
        if cc.has_pooled_conditioning(model):
            raise ValueError("Zero-shot Adapt supports UNets conditioned on text tokens only (SD1.x / SD2.x); this "
                             "model also needs pooled conditioning (SDXL-like)")
        mapper, _ = load_mapper(cc.mapper_file_path(mapper_name))
        check_mapper_fits(mapper, clip_vision, clip, mapper_name)
        model = cc.static_patcher(model)
        make_autograd_safe(*cc.torch_modules(model, vae, clip_vision))
        with grad_enabled():
            pairs = PromptPairs(clip, paired_encoder(clip, clip_vision), mapper,
                                clip_vision_embeds(clip_vision, images).clone(), source_label, target_label)
            adapter, losses = train_adapter(model, vae, clip_vision, images, pairs, iterations, lr, rank, seed)
        return io.NodeOutput(adapter, loss_plot(losses, title="Prompt mapper loss")[None])


def train_adapter(model, vae, clip_vision, images, pairs: PromptPairs, iterations: int, lr: float, rank: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    modules = {generic_module_name(k): trainable_lowrank(s, rank, generator) for k, s in attention_targets(model).items()}
    adapter = Adapter(modules=modules, role="style", method="ipl-zero-shot", source="Zero-shot Adapt")
    patched = model.clone()
    install_switched_adapters(patched, {ADAPTED: adapter}, frozenset({ADAPTED}))
    cc.load_for_direct_calls(patched)
    latents = cc.to_model_space(patched, vae_encode(vae, images).clone())
    low, high = cc.percent_to_sigma(patched, 0.8), cc.percent_to_sigma(patched, 0.2)

    def step_loss(step: int, micro: int) -> torch.Tensor:
        index = step % latents.shape[0]
        sigma = low + (high - low) * torch.rand(1, generator=generator)
        return adaptation_step(patched, vae, clip_vision, latents[index:index + 1], pairs.conds[index], pairs, index,
                               sigma, generator)

    state = optimise(trainable_parameters(modules), step_loss, iterations, lambda step: lr, ADAM,
                     on_step=cc.progress_steps(iterations))
    return adapter.replace(modules=frozen_copy(modules)), state.losses
