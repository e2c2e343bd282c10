"""Train Personalized Residual (Ham et al., CVPR 2024): one low-rank residual on every transformer block's proj_out,
rank 5% of its channels, ε loss on 'a photo of a V* <class>', lr 1e-3, batch 4, about 150 steps. Everything else is
frozen. The ADAPTER feeds Apply Localized Residual (LAG)."""
from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from ..core.layouts import generic_module_name
from ..core.localized import new_residual, residual_rank
from ..core.trainers import (METHOD_OPTIONS, RESIDUAL_CAPTION, TrainingOptions, residual_captions, select_targets,
                             trainable_token_rows)
from ..core.training import TARGETS, Phase
from . import comfy_compat as cc
from .common import PackNode, schema
from .training import (SEED_MAX, Job, Stage, TrainedToken, node_output, outputs, require, run_training,
                       saving_inputs, shared_inputs)
from ..core import metadata as META

CONCEPT_WORDS_KEY = META.CONCEPT_WORDS  # file metadata: the words to give Apply Localized Residual


def residual_modules(model, rank_fraction: float, seed: int):
    """{module: zero-start residual factors} on every transformer proj_out (rank = fraction x channels), and a
    redraw function."""
    shapes = {generic_module_name(k): s for k, s in select_targets(cc.weight_shapes(model), "proj_out").items()}
    generator = torch.Generator().manual_seed(seed)

    def fresh(name: str):
        return new_residual(shapes[name], residual_rank(shapes[name][0], rank_fraction), generator, 0.0)
    return {name: fresh(name) for name in sorted(shapes)}, fresh


TOKEN_LR_DEFAULT = 5e-3  # textual inversion's rate (Gal et al.): an embedding row moves far slower than a residual


def identifier_token(clip, identifier: str, captions: tuple[str, ...]) -> tuple[TrainedToken, object, torch.Tensor]:
    """V*'s token-embedding rows as a trainable module: (the token, its fresh factors, their gradient mask). Refuses
    an identifier that no caption contains."""
    key = cc.token_embedding_key(clip)
    special = cc.special_token_ids(clip)
    ids = tuple(dict.fromkeys(t for t in cc.token_ids(clip, identifier) if t not in special))
    if not ids or not any(set(ids) <= set(cc.token_ids(clip, c)) for c in captions):
        raise ValueError(f"learn_token_embedding: no caption contains the identifier {identifier!r} (captions: "
                         f"{sorted(set(captions))[:3]}); put it in the caption template or the data's captions")
    module = "text_encoders." + key[: -len(".weight")]
    vocab, width = cc.weight_shapes(clip=clip)[key]
    factors, mask = trainable_token_rows(ids, vocab, width)
    rows, dtype = cc.token_embedding_rows(clip, key, ids)
    return TrainedToken(module, key, ids, rows, dtype), factors, mask


class TrainPersonalizedResidual(PackNode):
    """Personalized Residuals: low-rank residuals on the proj_out of every transformer block (rank 5% of the
    channels), trained with the ε loss on 'a photo of a V* <class>' captions, everything else frozen. Feed the
    adapter to Apply Localized Residual with the identifier and class word as concept words."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainPersonalizedResidual", "Train Personalized Residual", inputs=[
                *shared_inputs(),
                io.String.Input("identifier", default="sks", tooltip="V*: the rare word the concept is bound to."),
                io.String.Input("class_word", default="dog", tooltip="The concept's class (dog, cat, toy, star...)."),
                io.String.Input("caption", default=RESIDUAL_CAPTION, tooltip="Caption of every image ({identifier}, "
                                "{class_word} filled in); empty: the data's own captions."),
                io.Float.Input("rank_fraction", default=0.05, min=0.001, max=1.0, step=0.001,
                               tooltip="Rank as a fraction of each block's channels (paper: 5%, 16/32/64 for "
                                       "320/640/1280)."),
                io.Int.Input("steps", default=150, min=1, max=1000000, tooltip="Optimiser steps (paper: about 150)."),
                io.Float.Input("lr", default=1e-3, min=1e-8, max=1.0, step=1e-4, tooltip="Learning rate (paper: 1e-3)."),
                io.Combo.Input("loss", options=list(TARGETS), default="epsilon", tooltip="Loss target (paper: epsilon)."),
                io.Boolean.Input("learn_token_embedding", default=False, optional=True,
                                 tooltip="Also train the identifier's token embedding (the paper does not say whether "
                                         "it does). The adapter then patches the CLIP too: give Apply Adapters or "
                                         "Apply Localized Residual the CLIP."),
                io.Float.Input("token_lr", default=TOKEN_LR_DEFAULT, min=1e-8, max=1.0, step=1e-4, optional=True,
                               tooltip="Learning rate of the token embedding (textual inversion's 5e-3), on the same "
                                       "schedule as lr."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of init, batches, noise, timesteps."),
                *saving_inputs(),
            ],
            outputs=outputs(),
        )

    @classmethod
    def execute(cls, model, data, identifier: str, class_word: str, caption: str, rank_fraction: float,
                steps: int, lr: float, loss: str, seed: int, filename: str, overwrite: bool, resume_from: str,
                options: TrainingOptions | None = None, learn_token_embedding: bool = False,
                token_lr: float = TOKEN_LR_DEFAULT, clip=None, vae=None) -> io.NodeOutput:
        options = options or METHOD_OPTIONS["personalized-residuals"]
        if caption.strip():
            data = dataclasses.replace(data, captions=residual_captions(caption, identifier, class_word,
                                                                        len(data.captions)))
        modules, fresh = residual_modules(model, rank_fraction, seed)
        settings = {"identifier": identifier, "class_word": class_word, "caption": caption,
                    "rank_fraction": rank_fraction, "steps": steps, "lr": lr, "loss": loss, "seed": seed}
        token, masks, scales = None, {}, {}
        if learn_token_embedding:
            require(clip, "clip", "learn the identifier's token embedding")
            token, factors, mask = identifier_token(clip, identifier, data.captions)
            modules[token.module] = factors
            masks, scales = {f"{token.module}.up": mask}, {f"{token.module}.down": token_lr / lr}
            settings.update(learn_token_embedding=True, token_lr=token_lr, token_ids=list(token.ids))
        stage = Stage(options.recipe((Phase(steps, loss, lr),), seed), tuple(modules))
        job = Job("Train Personalized Residual", "personalized-residuals", "concept", modules, fresh, (stage,), options,
                  settings, masks=masks, tensor_lr_scales=scales, token=token,
                  metadata={CONCEPT_WORDS_KEY: f"{identifier.strip()} {class_word.strip()}"})
        return node_output(run_training(model, vae, clip, data, job, filename, overwrite, resume_from))
