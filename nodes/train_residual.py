"""Train Personalized Residual (Ham et al., CVPR 2024): one low-rank residual on every transformer block's proj_out,
rank 5% of its channels, ε loss on 'a photo of a V* <class>', lr 1e-3, batch 4, about 150 steps. Everything else is
frozen. The ADAPTER feeds Apply Localized Residual (LAG)."""
from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from ..core.layouts import generic_module_name
from ..core.localized import new_residual, residual_rank
from ..core.trainers import METHOD_OPTIONS, RESIDUAL_CAPTION, TrainingOptions, residual_captions, select_targets
from ..core.training import TARGETS, Phase
from . import comfy_compat as cc
from .common import PackNode, schema
from .training import SEED_MAX, Job, Stage, node_output, outputs, run_training, saving_inputs, shared_inputs

CONCEPT_WORDS_KEY = "csa.concept_words"  # file metadata: the words to give Apply Localized Residual


def residual_modules(model, rank_fraction: float, seed: int):
    """{module: zero-start residual factors} on every transformer proj_out (rank = fraction x channels), and a
    redraw function."""
    shapes = {generic_module_name(k): s for k, s in select_targets(cc.weight_shapes(model), "proj_out").items()}
    generator = torch.Generator().manual_seed(seed)

    def fresh(name: str):
        return new_residual(shapes[name], residual_rank(shapes[name][0], rank_fraction), generator, 0.0)
    return {name: fresh(name) for name in sorted(shapes)}, fresh


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
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of init, batches, noise, timesteps."),
                *saving_inputs(),
            ],
            outputs=outputs(),
        )

    @classmethod
    def execute(cls, model, clip, vae, data, identifier: str, class_word: str, caption: str, rank_fraction: float,
                steps: int, lr: float, loss: str, seed: int, filename: str, overwrite: bool, resume_from: str,
                options: TrainingOptions | None = None) -> io.NodeOutput:
        options = options or METHOD_OPTIONS["personalized-residuals"]
        if caption.strip():
            data = dataclasses.replace(data, captions=residual_captions(caption, identifier, class_word,
                                                                        len(data.captions)))
        modules, fresh = residual_modules(model, rank_fraction, seed)
        stage = Stage(options.recipe((Phase(steps, loss, lr),), seed), tuple(modules))
        settings = {"identifier": identifier, "class_word": class_word, "caption": caption,
                    "rank_fraction": rank_fraction, "steps": steps, "lr": lr, "loss": loss, "seed": seed}
        job = Job("Train Personalized Residual", "personalized-residuals", "concept", modules, fresh, (stage,), options,
                  settings, metadata={CONCEPT_WORDS_KEY: f"{identifier.strip()} {class_word.strip()}"})
        return node_output(run_training(model, vae, clip, data, job, filename, overwrite, resume_from))
