"""QR Merge and Convert to QR-LoRA: content and style adapters on a shared orthonormal basis."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter
from ..core.merge import CONCATENATED, INTERFERENCE_MODES, MERGED_FORMS, Term, merge_layers, overlap_summary
from ..core.qr_lora import convert_layers
from ..core.layouts import generic_module_name
from . import comfy_compat
from .model_binding import apply_patch_groups, bind_to_model, describe_binding, patches_by_strength
from .common import PackNode, schema, strength_input
from .sockets import AdapterSocket

EXTRA = {"content": ("content_2", "content_3"), "style": ("style_2", "style_3")}


def merge_terms(model, adapters_by_role: dict[str, list[Adapter]], lambdas: dict[str, float]):
    """{model key: terms}: every adapter bound to the model, weighted by λ of its slot's role and its strength;
    and one binding line per adapter (what mapped, what did not)."""
    terms: dict[str, list[Term]] = {}
    bindings = []
    for role, adapters in adapters_by_role.items():
        for adapter in adapters:
            binding = bind_to_model(adapter, model)
            bindings.append(describe_binding(adapter, binding, model))
            for key, (_, factors) in binding.targets.items():
                terms.setdefault(key, []).append(Term(factors, lambdas[role] * adapter.strength, role))
    return terms, bindings


class QRMerge(PackNode):
    """Merge content and style adapters as W0 + Q (λc ΔRc + λs ΔRs): QR-LoRA adapters of one base share Q and merge
    exactly; ordinary LoRAs merge exactly as concatenated factors, or on one orthonormal basis for all their
    up-spaces (rank at most the sum of ranks). Reports per-layer overlap."""

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
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the merged adapter patched in."),
                AdapterSocket.Output(display_name="merged", tooltip="The merged adapter (save it with Save Adapter)."),
                io.String.Output(display_name="report",
                                 tooltip="Per layer: merge path and principal-angle cosines between content and "
                                         "style (out: output space, in: input space; 1 = same, 0 = orthogonal)."),
            ],
        )

    @classmethod
    def execute(cls, model, content, style, lambda_content: float, lambda_style: float, interference: str,
                merged_form: str = CONCATENATED, **extra) -> io.NodeOutput:
        adapters = {role: [first, *[extra[s] for s in slots if extra.get(s) is not None]]
                    for (role, slots), first in zip(EXTRA.items(), (content, style))}
        terms, bindings = merge_terms(model, adapters, {"content": lambda_content, "style": lambda_style})
        layers = merge_layers(terms, interference, on_layer=comfy_compat.progress_steps(len(terms)), form=merged_form)
        merged = Adapter(modules={generic_module_name(k): layer.factors for k, layer in layers.items()},
                         role="generic", method="qr-merge", base=comfy_compat.model_name(model), source="QR Merge")
        report = "\n".join(overlap_summary(layers) + bindings)
        if lambda_content == 0 and lambda_style == 0:
            return io.NodeOutput(model, merged, "λ_content = λ_style = 0: model unchanged\n" + report)
        patched, _ = apply_patch_groups(model, None, patches_by_strength([merged], model, None, {})[0])
        return io.NodeOutput(patched, merged, report)


class ConvertToQRLoRA(PackNode):
    """Express an ordinary LoRA trained on this base in QR-LoRA form: Q from the base weight's top-r subspace
    (randomized SVD; the report gives W's rank-r fit error), ΔR = Qᵀ ΔW. Adapters converted on one base share Q, so
    QR Merge combines them at rank r. The part of ΔW outside span(Q) is dropped and reported."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ConvertToQRLoRA", "Convert to QR-LoRA", inputs=[
                io.Model.Input("model", tooltip="The base model the adapter was trained on."),
                AdapterSocket.Input("adapter", tooltip="The adapter to convert."),
                io.Int.Input("rank", default=64, min=1, max=1280, tooltip="r: columns of Q (QR-LoRA's rank)."),
            ],
            outputs=[
                AdapterSocket.Output(display_name="adapter", tooltip="The adapter in QR-LoRA form (method qr-lora)."),
                io.String.Output(display_name="report", tooltip="Per layer: the share of ΔW outside span(Q) (0 = kept whole)."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter: Adapter, rank: int) -> io.NodeOutput:
        binding = bind_to_model(adapter, model)
        deltas = {key: factors.delta(torch.float32) * adapter.strength for key, (_, factors) in binding.targets.items()}
        weights = comfy_compat.base_weights(model, deltas)
        converted = convert_layers(deltas, {k: w.to(torch.float32) for k, w in weights.items()}, rank,
                                   on_layer=comfy_compat.progress_steps(len(deltas)))
        modules = {generic_module_name(key): c.factors for key, c in converted.items()}
        report = "\n".join([f"{key}: {c.residual_ratio:.4f} of ΔW outside span(Q); W's rank-r fit error "
                            f"{c.fit_error:.4f}" for key, c in converted.items()] +
                           [describe_binding(adapter, binding, model)])
        qr_adapter = adapter.replace(modules=modules, method="qr-lora", strength=1.0, base=comfy_compat.model_name(model))
        return io.NodeOutput(qr_adapter, report)
