"""Train ZipLoRA: learn per-column merger coefficients for a content and a style adapter on each one's own images;
the result is one plain LoRA that any LoRA loader applies."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter, LowRank, is_pointwise_weight
from ..core.adapter_file import path_inside, read_safetensors, write_safetensors
from ..core.dense import carried_diffs, sum_diffs
from ..core.formats import adapter_metadata, tensors_from_module_tensors, tensors_from_modules
from ..core.layouts import generic_module_name
from ..core.merge import Term, concatenated_factors
from ..core.trainers import METHOD_OPTIONS, TrainingOptions, state_file_contents, state_from_file, weights_hash
from ..core.training import TARGETS, Periodic, Phase, TrainState
from ..core.training_data import TrainingImages
from ..core.ziplora import (CONTENT, DEFAULT_LR, DEFAULT_SIMILARITY_WEIGHT, DEFAULT_STEPS, MEAN_PRODUCT, MERGED,
                            PENALTIES, STYLE, ZipLayer, new_layer, parameters, scaled, train_ziplora)
from . import comfy_compat as cc
from .common import PackNode, schema
from .model_binding import MergeInput, merge_input
from .runtime_adapters import ACTIVE_KEY, add_to_forward, publish_call_options, switched_by_active_set
from .sockets import AdapterSocket, TrainingDataSocket
from .training import (NO_RESUME, SEED_MAX, STATE_SUFFIX, Result, encode_training_set, grad_enabled, make_autograd_safe,
                       node_output, outputs, preview_image, preview_task, refuse_planned_files, saving_inputs,
                       state_path, step_path, step_reporter)
from ..core import metadata as META

METHOD = "ziplora"
VALUES_PREFIX = META.VALUES_PREFIX  # the merger vectors themselves in the state file, beside the optimiser's slots


class ZipPlan:
    """What a ZipLoRA run merges: the layers it learns vectors for (Linear and 1x1 conv weights) and the changes it
    keeps at the direct merge (kxk conv layers, bias and norm diffs), each adapter at its own strength."""

    def __init__(self, content: MergeInput, style: MergeInput, shapes: dict):
        self.layers: dict[str, ZipLayer] = {}
        self.fixed: dict[str, list[LowRank]] = {}
        inputs = (content, style)
        for key in sorted({*content.factors, *style.factors}):
            pair = [scaled(i.factors[key], i.strength) if key in i.factors else None for i in inputs]
            if is_pointwise_weight(shapes[key]):
                self.layers[key] = new_layer(*pair)
            else:
                self.fixed[key] = [f for f in pair if f is not None]
        self.vectors = sum_diffs({k: [(i.vectors[k], i.strength) for i in inputs if k in i.vectors]
                                  for k in {*content.vectors, *style.vectors}})
        # the two adapters at their strengths: a run resumes only with the same ones
        changes = [(k, role, f) for k, layer in self.layers.items() for role, f in ((CONTENT, layer.content),
                                                                                   (STYLE, layer.style)) if f is not None]
        changes += [(k, str(i), f) for k, fixed in self.fixed.items() for i, f in enumerate(fixed)]
        self.fingerprint = weights_hash({f"{k}.{role}.{part}": getattr(f, part) for k, role, f in changes
                                         for part in ("up", "down")} | {f"{k}.vector": v for k, v in self.vectors.items()})

    def merged_adapter(self, base: str) -> Adapter:
        modules = {generic_module_name(k): layer.merged() for k, layer in self.layers.items()}
        for key, factors in self.fixed.items():
            terms = [Term(f, 1.0, "content") for f in factors]
            modules[generic_module_name(key)] = concatenated_factors(terms, factors[0].delta_shape, torch.float32)
        tensors = {generic_module_name(k): t for k, t in carried_diffs(self.vectors).items()}
        return Adapter(modules=modules, module_tensors=tensors, method=METHOD, base=base, source="Train ZipLoRA")

    def describe(self) -> list[str]:
        both = sum(layer.content is not None and layer.style is not None for layer in self.layers.values())
        lines = [f"ZipLoRA: merger vectors on {len(self.layers)} layers ({both} changed by both adapters)"]
        if self.fixed or self.vectors:
            lines.append(f"kept at the direct merge (no merger vector): {len(self.fixed)} kxk conv layers "
                         f"{sorted(self.fixed)[:4]}, {len(self.vectors)} bias / norm changes")
        return lines


class ZipTrainee:
    """A clone of the model whose merged layers add, per UNet call, the merged change (the default), or one
    adapter's alone (the teachers): ``predict(which, x_σ, σ, conds)``."""

    def __init__(self, model, plan: ZipPlan):
        self.model = model.clone()
        shapes = cc.weight_shapes(model)
        for key, layer in plan.layers.items():
            terms = {MERGED: (layer, 1.0)}
            terms.update({role: (f, 1.0) for role, f in ((CONTENT, layer.content), (STYLE, layer.style)) if f is not None})
            add_to_forward(self.model, key, shapes[key], terms, switched_by_active_set(tuple(terms)))
        cc.set_transformer_option(self.model, ACTIVE_KEY, frozenset({MERGED}))
        publish_call_options(self.model)
        cc.load_for_direct_calls(self.model)

    def predict(self, which: str, noisy, sigma, conds):
        with cc.differentiable_forward(self.model):
            return cc.denoised(self.model, noisy, sigma, cc.batch_conds(conds), {ACTIVE_KEY: frozenset({which})})

    def preview(self, clip, vae, prompt: str, seed: int, size: int) -> torch.Tensor:
        return preview_image(self.model, clip, vae, prompt, seed, size)


class ZipFiles:
    """The merged LoRA file and, beside it, the training state (merger vectors, optimiser, losses); atomic, never
    overwriting unless asked."""

    def __init__(self, plan: ZipPlan, filename: str, overwrite: bool, record: dict, options: TrainingOptions, model):
        self.plan, self.overwrite, self.record, self.options, self.model = plan, overwrite, record, options, model
        self.path = path_inside(cc.lora_save_root(), "", filename) if filename.strip() else None

    def check(self, steps: int, done: int) -> None:
        refuse_planned_files(self.path, self.overwrite, self.options.save_every, steps, done)

    def write(self, path: Path, state: TrainState) -> str:
        adapter = self.plan.merged_adapter(cc.model_name(self.model))
        names = {n: n for n in adapter.module_names}
        metadata = {**adapter_metadata(adapter, self.record), META.STEPS_DONE: str(state.step)}
        written = write_safetensors(path, {**tensors_from_modules(adapter.modules, names),
                                           **tensors_from_module_tensors(adapter.module_tensors, names)},
                                    metadata, overwrite=self.overwrite)
        vectors = parameters(self.plan.layers)
        tensors, meta = state_file_contents(state, list(vectors), self.record)
        tensors.update({VALUES_PREFIX + name: v.detach().clone() for name, v in vectors.items()})
        write_safetensors(state_path(path), tensors, meta, overwrite=self.overwrite)
        return str(written)

    def periodic(self) -> Periodic:
        return Periodic(self.options.save_every if self.path is not None else 0,
                        lambda step, state: self.write(step_path(self.path, step), state))


def resume_vectors(name: str, plan: ZipPlan, record: dict) -> TrainState:
    """Load a saved run's merger vectors into the plan; its optimiser state and losses. Refuses another run's file."""
    state_file = state_path(Path(cc.adapter_file_path(name)))
    if not state_file.is_file():
        raise ValueError(f"resume_from {name!r}: no training state beside it ({state_file.name}); only files saved by "
                         f"Train ZipLoRA can be resumed here")
    tensors, metadata = read_safetensors(state_file, suffix=STATE_SUFFIX)
    vectors = parameters(plan.layers)
    state, saved = state_from_file(tensors, metadata, state_file.name, list(vectors))
    wanted = {k: record[k] for k in ("method", "base_hash", "adapters_hash")}
    if {k: saved.get(k) for k in wanted} != wanted:
        raise ValueError(f"resume_from {name!r} merged other adapters or another base ({ {k: saved.get(k) for k in wanted} }); "
                         f"this node merges {wanted}")
    with torch.no_grad():
        for key, vector in vectors.items():
            vector.copy_(tensors[VALUES_PREFIX + key])
    return state


class TrainZipLoRA(PackNode):
    """ZipLoRA (Shah et al., ECCV 2024): merge a content and a style adapter with one learned coefficient per input
    column and layer, so that the merged model predicts like the content adapter on the content images and like the
    style adapter on the style images, with a penalty on the two coefficient vectors' similarity. Starts at the
    direct merge; the result is a plain LoRA of rank r_c + r_s. Any kind Load Adapter reads enters through its ΔW."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "TrainZipLoRA", "Train ZipLoRA", inputs=[
                io.Model.Input("model", tooltip="The base model both adapters were trained on; it is never changed."),
                AdapterSocket.Input("content", tooltip="The subject adapter (at its loader's strength)."),
                AdapterSocket.Input("style", tooltip="The style adapter (at its loader's strength)."),
                TrainingDataSocket.Input("content_data", tooltip="The content adapter's own images and captions (or "
                                                                  "latents and conditioning)."),
                TrainingDataSocket.Input("style_data", tooltip="The style adapter's own images and captions (same "
                                                                "resolution)."),
                io.Int.Input("steps", default=DEFAULT_STEPS, min=1, max=100000, tooltip="Optimiser steps (paper: 100)."),
                io.Float.Input("lr", default=DEFAULT_LR, min=1e-6, max=1.0, step=1e-3,
                               tooltip="Learning rate of the merger vectors (paper: 0.01)."),
                io.Float.Input("similarity_weight", default=DEFAULT_SIMILARITY_WEIGHT, min=0.0, max=100.0, step=0.001,
                               tooltip="λ on the similarity of each layer's two vectors (paper: 0.01; 0: off)."),
                io.Combo.Input("penalty", options=list(PENALTIES), default=MEAN_PRODUCT,
                               tooltip="How the vectors' similarity is measured: the common implementation's mean |m_c "
                                       "m_s| (moves from the all-ones start), the paper's |m_c · m_s|, or |cos| (flat "
                                       "at the start)."),
                io.Combo.Input("loss", options=list(TARGETS), default="epsilon",
                               tooltip="The space the merged and the single-adapter predictions are compared in."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, tooltip="Seed of batches, noise and noise levels."),
                *saving_inputs(),
                io.Clip.Input("clip", optional=True, tooltip="Encodes the captions and the preview prompt; not needed "
                                                             "for Training Latents without previews."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the images and decodes previews; not needed for "
                                                           "Training Latents without previews."),
            ],
            outputs=outputs([io.String.Output(display_name="report", tooltip="Which layers got merger vectors and "
                                                                             "what was kept at the direct merge.")]),
        )

    @classmethod
    def execute(cls, model, content: Adapter, style: Adapter, content_data: TrainingImages,
                style_data: TrainingImages, steps: int, lr: float, similarity_weight: float, penalty: str, loss: str,
                seed: int, filename: str, overwrite: bool, resume_from: str = NO_RESUME,
                options: TrainingOptions | None = None, clip=None, vae=None) -> io.NodeOutput:
        options = options or METHOD_OPTIONS["lora"]
        recipe = options.recipe((Phase(steps, loss, lr),), seed)
        inputs = (merge_input(content, model, CONTENT), merge_input(style, model, STYLE))
        result, plan = run_ziplora(model, clip, vae, inputs, content_data, style_data, recipe, penalty,
                                   similarity_weight, options, filename, overwrite, resume_from)
        return node_output(result, "\n".join(plan.describe()))


def run_ziplora(model, clip, vae, inputs: tuple[MergeInput, MergeInput], content_data, style_data, recipe,
                penalty: str, weight: float, options: TrainingOptions, filename: str, overwrite: bool,
                resume_from: str) -> tuple[Result, ZipPlan]:
    model = cc.static_patcher(model)
    make_autograd_safe(*cc.torch_modules(model))
    with grad_enabled():  # the merger vectors and the factors they scale: normal tensors, not a node's inference ones
        plan = ZipPlan(*inputs, cc.weight_shapes(model))
        sigmas = cc.sigma_table(model)
        sets = [encode_training_set(model, vae, clip, data) for data in (content_data, style_data)]
        record = {"trainer": "Train ZipLoRA", "method": METHOD, "adapters_hash": plan.fingerprint,
                  "base_hash": weights_hash(cc.base_weights(model, list(plan.layers) + list(plan.fixed))),
                  "data": content_data.describe(), "style_data": style_data.describe(),
                  "settings": {"penalty": penalty, "similarity_weight": weight}, "stages": [recipe.describe()]}
        files = ZipFiles(plan, filename, overwrite, {**record, "trigger": content_data.trigger}, options, model)
        state = resume_vectors(resume_from, plan, record) if resume_from and resume_from != NO_RESUME else None
        files.check(recipe.steps, state.step if state else 0)
        trainee = ZipTrainee(model, plan)
        progress, previews = cc.training_progress(recipe.steps), []
        tasks = (files.periodic(), preview_task(trainee, clip, vae, content_data.size, options, previews, progress, 0))
        state = train_ziplora(trainee.predict, sets[0], sets[1], sigmas, plan.layers, recipe, penalty, weight, state,
                              step_reporter(progress, recipe.steps, 0, []), tasks, cc.noising(model))
        if options.preview_prompt.strip():
            previews.append(trainee.preview(clip, vae, options.preview_prompt, options.preview_seed, content_data.size))
        path = files.write(files.path, state) if files.path is not None else ""
    adapter = plan.merged_adapter(cc.model_name(model)).replace(metadata={META.CREATED_WITH: json.dumps(record)})
    blank = torch.ones(1, content_data.size, content_data.size, 3)
    return Result(adapter, state.losses, [], torch.cat(previews) if previews else blank, path), plan
