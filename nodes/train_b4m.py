"""B4M (Break-for-Make) in the graph: Train B4M Content, Train B4M Style (Partly Learnable Projection + Multi-
Correspondence Projection) and B4M Make (the make stage, optionally with its joint fine-tune). The math is
core/b4m.py; the runs go through the pack's one engine (nodes/training.py). Files are in B4M's own layout
('unet.unet.<diffusers path>.lora.up / lora.down', scale 1), which Load Adapter reads."""
from __future__ import annotations

import json

import torch
from comfy_api.latest import io

from ..core import metadata as META
from ..core.adapter import Adapter, LowRank
from ..core.b4m import MAIN_PART, RUN_KEY, SEED_KEY, frozen_masks, make, plp_lora
from ..core.layouts import generic_module_name
from ..core.trainers import BLOCK_PRESET, METHOD_OPTIONS, TrainingOptions, parse_blocks, select_targets
from ..core.training import TARGETS, Phase
from . import comfy_compat as cc
from .common import PackNode, schema
from .model_binding import bind_to_model
from .sockets import AdapterSocket, TrainingDataSocket, TrainingOptionsSocket
from .training import (SEED_MAX, Job, Stage, node_output, outputs, run_training, save_adapter_file, saving_inputs,
                       shared_inputs)

B4M_TARGETS = ("attention projections", BLOCK_PRESET, "all linear")
OTHER_PART = {"down": "up", "up": "down"}


def b4m_inputs(run: str) -> list:
    main, aux = ("content", "style") if run == "content" else ("style", "content")
    return [
        *shared_inputs(),
        TrainingDataSocket.Input("auxiliary_data", optional=True, tooltip=f"Auxiliary {aux} data sets (images with their "
                                 f"own captions) on which the {OTHER_PART[MAIN_PART[run]]} factor's free half trains at "
                                 f"lr_auxiliary (Multi-Correspondence Projection); unconnected: it keeps its initial "
                                 f"values."),
        io.Combo.Input("targets", options=list(B4M_TARGETS), default="attention projections",
                       tooltip="B4M adapts to_q / to_k / to_v / to_out.0 of attn1 and attn2 of every transformer block "
                               "(official; or only inside the listed blocks). 'all linear' also adapts the feed-forward "
                               "layers, proj_in / proj_out and the other Linear and 1x1 conv weights, each split into "
                               "halves the same way (not in the paper: for bases whose attention alone cannot hold a "
                               "shape)."),
        io.String.Input("blocks", default="", tooltip=f"Blocks for '{BLOCK_PRESET}'."),
        io.Int.Input("rank", default=64, min=2, max=1024, tooltip="LoRA rank (official: 64)."),
        io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="Optimiser steps (official: 1000)."),
        io.Float.Input("lr", default=1e-4, min=1e-8, max=1.0, step=1e-5,
                       tooltip=f"Learning rate of the {MAIN_PART[run]} factor on the {main} images (official 1e-4)."),
        io.Float.Input("lr_auxiliary", default=1e-5, min=0.0, max=1.0, step=1e-6,
                       tooltip=f"Learning rate of the {OTHER_PART[MAIN_PART[run]]} factor on the auxiliary data "
                               f"(official 1e-5)."),
        io.Boolean.Input("orthogonal_init", default=True, tooltip="Frozen halves of square layers from one orthonormal "
                         "basis (official); off: the usual init (down N(0, 1/r²), up 0)."),
        io.Combo.Input("loss", options=list(TARGETS), default="epsilon", tooltip="Loss target (official: epsilon)."),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of the factors' init (the frozen halves: give "
                     "the content run and the style run one seed, or they cannot be made into one adapter), batches, "
                     "noise and timesteps. Recorded in the file."),
        *saving_inputs(),
        io.Boolean.Input("orthogonal_non_square", default=False, optional=True,
                         tooltip="Not in the paper: also give non-square layers (cross-attention to_k / to_v, "
                                 "feed-forwards) orthonormal frozen halves, so the content run's trained half of down "
                                 "reaches them (with the official init their up's frozen half is zero). Square layers "
                                 "draw the same either way. Give both runs the same choice."),
    ]


def plp_modules(model, targets: str, blocks: str, rank: int, seed: int, orthogonal: bool, non_square: bool):
    """{module: fresh PLP factors with gradients}, {'<module>.<part>': frozen-half mask}, a redraw function."""
    shapes = select_targets(cc.weight_shapes(model), targets, parse_blocks(blocks))
    by_name = {generic_module_name(key): shape for key, shape in shapes.items()}

    def fresh(name: str):
        factors = plp_lora(by_name[name], rank, seed, name, orthogonal, non_square)
        factors.up.requires_grad_()
        factors.down.requires_grad_()
        return factors

    modules = {name: fresh(name) for name in sorted(by_name)}
    masks = {}
    for name, factors in modules.items():
        up, down = frozen_masks(by_name[name], factors.rank)
        masks.update({f"{name}.up": up, f"{name}.down": down})
    return modules, masks, fresh


def b4m_key_form(model) -> str:
    """The saved files' module names: B4M's own (unet.unet.<diffusers path>, what its official SDXL code reads) on a
    UNet; ComfyUI's generic names on a DiT, where B4M has no file form of its own (the method and the run stay in the
    metadata, so Load Adapter and B4M Make read them back)."""
    return "b4m" if cc.is_unet(model) else "comfy"


def train_run(run: str, model, data, targets: str, blocks: str, rank: int, steps: int, lr: float,
              lr_auxiliary: float, orthogonal_init: bool, loss: str, seed: int, filename: str, overwrite: bool,
              resume_from: str, options: TrainingOptions | None = None, auxiliary_data=None,
              orthogonal_non_square=False, clip=None, vae=None):
    options = options or METHOD_OPTIONS["b4m"]
    modules, masks, fresh = plp_modules(model, targets, blocks, rank, seed, orthogonal_init, orthogonal_non_square)
    main = MAIN_PART[run]
    stage = Stage(options.recipe((Phase(steps, loss, lr),), seed), tuple(modules))
    settings = {"run": run, "targets": targets, "blocks": blocks, "rank": rank, "steps": steps, "lr": lr,
                "lr_auxiliary": lr_auxiliary, "orthogonal_init": orthogonal_init,
                "orthogonal_non_square": orthogonal_non_square, "loss": loss, "seed": seed,
                "main_part": main, "auxiliary_part": OTHER_PART[main] if auxiliary_data is not None else None}
    title = f"Train B4M {run.capitalize()}"
    if auxiliary_data is None:  # no MCP: only the main factor trains
        job = Job(title, "b4m", run, modules, fresh, (stage,), options, settings, masks, trained_parts=(main,),
                  metadata={SEED_KEY: str(seed), RUN_KEY: run}, key_form=b4m_key_form(model))
    else:
        job = Job(title, "b4m", run, modules, fresh, (stage,), options, settings, masks,
                  metadata={SEED_KEY: str(seed), RUN_KEY: run}, key_form=b4m_key_form(model), second=auxiliary_data,
                  second_routes=((main,), (OTHER_PART[main],)),
                  part_lr_scales={OTHER_PART[main]: lr_auxiliary / lr})
    return node_output(run_training(model, vae, clip, data, job, filename, overwrite, resume_from))


class TrainB4MContent(PackNode):
    """B4M stage 1 on the content images: Partly Learnable Projection LoRAs (half of up's rows and half of down's
    columns frozen, seeded), down's free half trained on the content images (lr 1e-4) while up's free half trains
    on auxiliary style data (lr 1e-5), both terms with the same noise and timestep."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainB4MContent", "Train B4M Content", inputs=b4m_inputs("content"), outputs=outputs())

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return train_run("content", **inputs)


class TrainB4MStyle(PackNode):
    """B4M stage 1 on the style images: the mirror of Train B4M Content (up's free half on the style images at
    lr 1e-4, down's free half on auxiliary content data at 1e-5). Give it the content run's seed."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainB4MStyle", "Train B4M Style", inputs=b4m_inputs("style"), outputs=outputs())

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return train_run("style", **inputs)


def float_copies(modules: dict) -> dict:
    return {n: LowRank(up=f.up.float().clone(), down=f.down.float().clone(), alpha=f.alpha) for n, f in modules.items()}


def run_factors(adapter: Adapter, model, slot: str) -> dict:
    """{generic module name: float factors} of a B4M run, whichever layout it came in; refuses the other run."""
    run = adapter.metadata.get(RUN_KEY)
    if run is not None and run != slot:
        raise ValueError(f"{slot}_run is a B4M {run} run ({adapter.source}); connect the {slot} run there")
    binding = bind_to_model(adapter, model)
    if binding.tensor_targets:
        raise ValueError(f"{adapter.source}: B4M runs are plain low-rank factors; this adapter has other kinds")
    if binding.sliced:  # B4M's frozen halves are per factor: joining slices would mix them
        raise ValueError(f"{adapter.source}: B4M runs patch whole weights; this one patches slices of "
                         f"{sorted(binding.sliced)[:3]}")
    return {generic_module_name(key): factors for key, (_, factors) in binding.targets.items()}


class B4MMake(PackNode):
    """B4M stage 2, make: one adapter from a content run and a style run of one seed (down = the style run's frozen
    half and the content run's trained half, up = the style run's up). Refuses runs whose frozen halves differ.
    With steps > 0, the short joint fine-tune on the style and the content images (sum of both losses, same noise
    and timestep), frozen halves kept, optionally with the official preconditioned gradients."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "B4MMake", "B4M Make", inputs=[
                AdapterSocket.Input("content_run", tooltip="Train B4M Content's adapter (or its file via Load Adapter)."),
                AdapterSocket.Input("style_run", tooltip="Train B4M Style's adapter, trained from the same seed."),
                io.Model.Input("model", tooltip="The base model both runs were trained on (names their layers)."),
                io.Clip.Input("clip", optional=True, tooltip="Fine-tune only: encodes the captions."),
                io.Vae.Input("vae", optional=True, tooltip="Fine-tune only: encodes the images."),
                TrainingDataSocket.Input("content_data", optional=True, tooltip="Fine-tune only: the content images."),
                TrainingDataSocket.Input("style_data", optional=True, tooltip="Fine-tune only: the style images."),
                io.Int.Input("steps", default=0, min=0, max=1000000,
                             tooltip="Joint fine-tune steps (0: make only; the official code runs up to 1000)."),
                io.Float.Input("lr", default=1e-4, min=1e-8, max=1.0, step=1e-5, tooltip="Fine-tune lr (official 1e-4)."),
                io.Boolean.Input("preconditioned", default=True, tooltip="Precondition the fine-tune's gradients as the "
                                 "official AdamWr: grad_up (down downᵀ + λI)⁻¹, (upᵀ up + λI)⁻¹ grad_down, then AdamW."),
                io.Float.Input("reg", default=1e-4, min=0.0, max=10.0, step=1e-4,
                               tooltip="λ of the preconditioner (the official default is 0; a small λ keeps nearly "
                                       "singular factors from blowing up a step)."),
                io.Combo.Input("loss", options=list(TARGETS), default="epsilon", tooltip="Fine-tune loss target."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Fine-tune batches, noise and timesteps."),
                io.String.Input("filename", default="", tooltip="Save the made adapter to the loras folder (B4M layout) "
                                "under this name, with the recipe in its metadata; empty: do not save."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace files of the same name."),
                TrainingOptionsSocket.Input("options", optional=True, tooltip="Fine-tune batch, accumulation, schedule... "
                                            "unconnected: B4M's official settings."),
            ],
            outputs=outputs(),
        )

    @classmethod
    def execute(cls, content_run: Adapter, style_run: Adapter, model, steps: int, lr: float, preconditioned: bool,
                reg: float, loss: str, seed: int, filename: str, overwrite: bool, clip=None, vae=None,
                content_data=None, style_data=None, options: TrainingOptions | None = None) -> io.NodeOutput:
        seeds = [run.metadata.get(SEED_KEY, "unknown") for run in (content_run, style_run)]
        content, style = run_factors(content_run, model, "content"), run_factors(style_run, model, "style")
        made = make(float_copies(content), float_copies(style), *seeds)
        metadata = {SEED_KEY: seeds[1], RUN_KEY: "made"}
        record = {"content_run": content_run.source, "style_run": style_run.source, "seeds": seeds, "steps": steps}
        if steps == 0:
            adapter = Adapter(modules=made, role="generic", method="b4m", base=cc.model_name(model), source="B4M Make",
                              metadata=metadata)
            path = save_adapter_file(adapter, model, filename, overwrite, b4m_key_form(model),
                                     {"trainer": "B4M Make", **record})
            blank = torch.ones(1, 64, 64, 3)
            return io.NodeOutput(adapter, torch.ones(1, 256, 512, 3), blank, path)
        missing = [name for name, value in (("content_data", content_data), ("style_data", style_data)) if value is None]
        if missing:  # CLIP and VAE only when the data are images (the engine names them then)
            raise ValueError(f"the joint fine-tune (steps > 0) needs {', '.join(missing)}; set steps to 0 to make only")
        options = options or METHOD_OPTIONS["b4m"]
        shapes = cc.weight_shapes(model)
        masks = {}
        for name, factors in made.items():
            factors.up.requires_grad_()
            factors.down.requires_grad_()
            up, down = frozen_masks(shapes[name + ".weight"], factors.rank)
            masks.update({f"{name}.up": up, f"{name}.down": down})
        stage = Stage(options.recipe((Phase(steps, loss, lr),), seed), tuple(made))
        settings = {**record, "lr": lr, "preconditioned": preconditioned, "reg": reg, "loss": loss, "seed": seed}

        def no_fresh(name: str):
            raise ValueError(f"B4M Make does not redraw {name}")
        job = Job("B4M Make", "b4m", "generic", made, no_fresh, (stage,), options, settings, masks,
                  metadata={**metadata, META.B4M_FINE_TUNE: json.dumps({"steps": steps, "preconditioned": preconditioned,
                                                                          "reg": reg})},
                  key_form=b4m_key_form(model), second=content_data, precondition=reg if preconditioned else None)
        return node_output(run_training(model, vae, clip, style_data, job, filename, overwrite))
