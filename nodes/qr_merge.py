"""QR Merge and Convert to QR-LoRA: content and style adapters on a shared orthonormal basis."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter
from ..core.dense import carried_diffs, exact_lowrank
from ..core.merge import (CONCATENATED, INTERFERENCE_MODES, MERGED_FORMS, OVERLAP_OFF, OVERLAP_SPACES, merge_layers,
                          overlap_summary)
from ..core.qr_lora import convert_layers
from ..core.layouts import generic_module_name
from . import comfy_compat
from .model_binding import (apply_patch_groups, bind_to_model, dense_changes, describe_binding, merge_input,
                            merged_adapter, patches_by_strength, weighted_terms, whole_targets)
from .common import PackNode, schema, strength_input
from .sockets import AdapterSocket

EXTRA = {"content": ("content_2", "content_3"), "style": ("style_2", "style_3")}


def diff_summary(diffs: dict, how: str) -> list[str]:
    return [f"{len(diffs)} biases and norm weights: changes {how} as diffs"] if diffs else []


class QRMerge(PackNode):
    """Merge content and style adapters as W0 + Q (λc ΔRc + λs ΔRs): QR-LoRA adapters of one base share Q and merge
    exactly; ordinary LoRAs merge exactly as concatenated factors, or on one orthonormal basis for all their
    up-spaces (rank at most the sum of ranks). LoHa, LoKr, OFT and other kinds enter as the exact low-rank form of
    their ΔW; bias and norm changes are summed as diffs. Reports per-layer overlap."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        adapter_input = AdapterSocket.Input
        return schema(cls, "QRMerge", "QR Merge", inputs=[
                io.Model.Input("model", tooltip="The base model; a patched clone is returned."),
                adapter_input("content", tooltip="Content adapter (its slot makes it content, whatever its file says)."),
                adapter_input("style", tooltip="Style adapter."),
                strength_input("lambda_content", "λ_content: multiplies every content adapter (times its own strength).",
                               limit=5.0),
                strength_input("lambda_style", "λ_style: multiplies every style adapter (times its own strength).",
                               limit=5.0),
                io.Combo.Input("interference", options=list(INTERFERENCE_MODES), default="off",
                               tooltip="Remove from the style coefficients their part in the content delta's input "
                                       "directions (or the reverse, or both) to reduce interference."),
                *[adapter_input(slot, optional=True, tooltip=f"Another {role} adapter.")
                  for role, slots in EXTRA.items() for slot in slots],
                io.Combo.Input("merged_form", options=list(MERGED_FORMS), default=CONCATENATED, optional=True,
                               tooltip="Ordinary LoRAs: concatenated factors (fast, rank = sum of ranks) or one "
                                       "orthonormal basis (compact: shared directions kept once). Interference "
                                       "removal always uses the basis; QR-LoRAs sharing Q always merge at rank r."),
                io.Combo.Input("overlap_report", options=list(OVERLAP_SPACES), default=OVERLAP_OFF, optional=True,
                               tooltip="Principal-angle cosines between content and style per layer in the report, "
                                       "in the output spaces (what the layers write) and/or the input spaces (what "
                                       "they read; where QR-LoRA's ΔR and interference removal live). Each space "
                                       "costs about 0.1-0.15x the merge's own time, so it is off unless asked."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the merged adapter patched in."),
                AdapterSocket.Output(display_name="merged", tooltip="The merged adapter (save it with Save Adapter)."),
                io.String.Output(display_name="report",
                                 tooltip="Per layer: merge path and principal-angle cosines between content and "
                                         "style (out: output space, in: input space; 1 = same, 0 = orthogonal); for "
                                         "kinds other than LoRA, the rank and error of ΔW's exact low-rank form."),
            ],
        )

    @classmethod
    def execute(cls, model, content, style, lambda_content: float, lambda_style: float, interference: str,
                merged_form: str = CONCATENATED, overlap_report: str = OVERLAP_OFF, **extra) -> io.NodeOutput:
        adapters = {role: [first, *[extra[s] for s in slots if extra.get(s) is not None]]
                    for (role, slots), first in zip(EXTRA.items(), (content, style))}
        inputs = [merge_input(adapter, model, role) for role, listed in adapters.items() for adapter in listed]
        terms, diffs = weighted_terms(inputs, {"content": lambda_content, "style": lambda_style})
        layers = merge_layers(terms, interference, on_layer=comfy_compat.progress_steps(len(terms)), form=merged_form,
                              overlap=overlap_report)
        merged = merged_adapter(layers, diffs, "QR Merge", comfy_compat.model_name(model))
        summary = overlap_summary(layers)
        if overlap_report == OVERLAP_OFF:
            summary.insert(1, "overlap report off (set overlap_report for content / style principal-angle cosines)")
        report = "\n".join(summary + diff_summary(diffs, "summed λ-weighted and carried") +
                           [line for i in inputs for line in i.forms] + [i.report for i in inputs])
        if lambda_content == 0 and lambda_style == 0:
            return io.NodeOutput(model, merged, "λ_content = λ_style = 0: model unchanged\n" + report)
        patched, _ = apply_patch_groups(model, None, patches_by_strength([merged], model, None, {})[0])
        return io.NodeOutput(patched, merged, report)


class ConvertToQRLoRA(PackNode):
    """Express an adapter trained on this base in QR-LoRA form: Q from the base weight's top-r subspace (randomized
    SVD; the report gives W's rank-r fit error), ΔR = Qᵀ ΔW (LoHa, LoKr, OFT and other kinds through their dense
    ΔW). Adapters converted on one base share Q, so QR Merge combines them at rank r. The part of ΔW outside
    span(Q) is dropped and reported per layer; bias and norm diffs are carried as diffs."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ConvertToQRLoRA", "Convert to QR-LoRA", inputs=[
                io.Model.Input("model", tooltip="The base model the adapter was trained on."),
                AdapterSocket.Input("adapter", tooltip="The adapter to convert."),
                io.Int.Input("rank", default=64, min=1, max=1280, tooltip="r: columns of Q (QR-LoRA's rank)."),
            ],
            outputs=[
                AdapterSocket.Output(display_name="adapter", tooltip="The adapter in QR-LoRA form (method qr-lora)."),
                io.String.Output(display_name="report",
                                 tooltip="Per layer: ΔW's kind and rank, the QR-LoRA rank and the share of ΔW outside "
                                         "span(Q) (0 = kept whole); bias and norm diffs are carried as diffs."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter: Adapter, rank: int) -> io.NodeOutput:
        binding = bind_to_model(adapter, model)
        targets = whole_targets(binding, model)  # a fused weight (FLUX qkv, linear1) is one weight: one Q for it
        deltas = {key: factors.delta(torch.float32) * adapter.strength for key, (_, factors) in targets.items()}
        kinds = {key: f"lora ΔW of rank {factors.rank}" for key, (_, factors) in targets.items()}
        vectors = {}
        for key, (kept, change) in dense_changes(adapter, binding, model).items():
            if change.ndim < 2:
                vectors[key] = change.to(torch.float32) * adapter.strength
                continue
            deltas[key] = change.to(torch.float32) * adapter.strength
            kinds[key] = f"{' + '.join(kept.weight_kinds)} ΔW of rank {exact_lowrank(change).factors.rank}"
        weights = comfy_compat.base_weights(model, deltas)
        converted = convert_layers(deltas, {k: w.to(torch.float32) for k, w in weights.items()}, rank,
                                   on_layer=comfy_compat.progress_steps(len(deltas)))
        modules = {generic_module_name(key): c.factors for key, c in converted.items()}
        report = "\n".join([f"{key}: {kinds[key]} -> QR-LoRA rank {c.factors.rank}, {c.residual_ratio:.4f} of ΔW "
                            f"outside span(Q); W's rank-r fit error {c.fit_error:.4f}" for key, c in converted.items()]
                           + diff_summary(vectors, "carried") +
                           [describe_binding(adapter, binding, model)])
        qr_adapter = adapter.replace(modules=modules, method="qr-lora", strength=1.0, base=comfy_compat.model_name(model),
                                     module_tensors={generic_module_name(k): kept
                                                     for k, kept in carried_diffs(vectors).items()})
        return io.NodeOutput(qr_adapter, report)
