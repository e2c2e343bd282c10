"""K-LoRA: a content and a style adapter combined without training, switched per layer and sampling step."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter, LowRank, is_pointwise_weight
from ..core.binding import normal_target, slice_of
from ..core.dense import carried_diffs
from ..core.klora import (BALANCES, DEFAULT_ALPHA, DEFAULT_BETA, PATTERNS, TRIMMED, WRAPPED, Schedule,
                          finest_projections, schedule, step_progress, winners_summary)
from ..core.layouts import generic_module_name
from . import comfy_compat as cc
from .common import PackNode, schema
from .model_binding import MergeInput, apply_patch_groups, merge_input, patches_by_strength
from .runtime_adapters import add_to_forward, publish_call_options
from .sockets import AdapterSocket

LEAVE_OUT, ADD_BOTH = "leave out (K-LoRA)", "add both (naive sum)"
OTHER_CHANGES = (LEAVE_OUT, ADD_BOTH)
REPORT_STEPS = 10  # the report's table of winners: this many evenly spaced steps


def switchable(inputs: dict[str, MergeInput], shapes: dict) -> tuple[dict[str, dict[str, LowRank]], dict[str, list]]:
    """({role: {key: factors}} of the layers K-LoRA switches: a Linear or 1x1 conv weight; {role: [keys]} of the other
    changes (kxk convs, biases and norm weights), which a run-time switch cannot add as ΔW x."""
    switched = {role: {} for role in inputs}
    others = {role: [] for role in inputs}
    for role, item in inputs.items():
        for key, factors in item.factors.items():
            if is_pointwise_weight(shapes[key]):
                switched[role][key] = factors
            else:
                others[role].append(key)
        others[role].extend(item.vectors)
    return switched, others


PROJECTION = "#"  # a projection of a fused weight, as K-LoRA's layers are named: '<weight key>#<first row>'


def projections(model, keys) -> dict[str, list[tuple[int, int]]]:
    """{fused weight key: [(first row, rows), ...]} for the weights ComfyUI's key map splits into projections along
    their output rows (FLUX's img / txt qkv and linear1's q, k, v and MLP input; SD3's qkv): K-LoRA switches each
    projection, as its official code does with diffusers' separate to_q / to_k / to_v."""
    found: dict[str, set] = {}
    for value in cc.lora_key_map(model).values():
        target = normal_target(value)
        part = None if target is None else slice_of(target)
        if part is not None and target[0] in keys and part[0] == 0:
            found.setdefault(target[0], set()).add((part[1], part[2]))
    return {key: parts for key, rows in found.items() if (parts := finest_projections(rows))}


def projection_factors(factors: LowRank, first: int, rows: int) -> LowRank:
    """The factors of one projection's change: up's other rows zero (the layer's output there unchanged)."""
    up = torch.zeros_like(factors.up)
    up[first:first + rows] = factors.up[first:first + rows]
    return LowRank(up=up, down=factors.down, alpha=factors.alpha)


def split_projections(layers: dict[str, LowRank], fused: dict[str, list[tuple[int, int]]]) -> dict[str, LowRank]:
    """K-LoRA's layers of one adapter: whole weights as they are, fused ones as the projections it changes (a
    diffusers file's to_q alone changes one third of a qkv weight: the others are no layer of that adapter)."""
    split = {}
    for key, factors in layers.items():
        if key in fused and not factors.extras:
            split.update({f"{key}{PROJECTION}{first}": projection_factors(factors, first, rows)
                          for first, rows in fused[key] if factors.up[first:first + rows].any()})
        else:
            split[key] = factors
    return split


def select_winner(plan: Schedule, layers: list[str], terms: dict):
    """A run-time select() for one weight: each of its K-LoRA layers' (the weight, or each projection of a fused
    weight) winner at the sampler step of the call (the first step outside a sampler), as its term names."""
    def select(options: dict):
        step = cc.sampler_step(options)
        progress = 0.0 if step is None else step_progress(*step)
        return [name for layer in layers if (name := f"{plan.winner(layer, progress)}|{layer}") in terms], None
    return select


def other_changes_adapter(item: MergeInput, keys: list[str], role: str) -> Adapter:
    """The changes K-LoRA does not switch, of one input, as an adapter at its strength (applied as weight patches)."""
    modules = {generic_module_name(k): item.factors[k] for k in keys if k in item.factors}
    vectors = carried_diffs({k: item.vectors[k] for k in keys if k in item.vectors})
    return Adapter(modules=modules, module_tensors={generic_module_name(k): t for k, t in vectors.items()},
                   role=role, strength=item.strength, source=f"K-LoRA {role}, not switched")


class KLoRA(PackNode):
    """K-LoRA (Ouyang et al., CVPR 2025), training-free: at each layer and sampling step, the content or the style
    adapter is applied, whichever has the larger sum of its K = r_c·r_s largest |ΔW| entries after the style side is
    scaled by the step (S = α·p + β, or S* = S mod α). Any kind Load Adapter reads enters through its ΔW. Works at
    run time (composes with other patches); the input model is never modified."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "KLoRA", "K-LoRA", inputs=[
                io.Model.Input("model", tooltip="The base model both adapters were trained on; a patched clone is "
                                                "returned."),
                AdapterSocket.Input("content", tooltip="The subject (content) adapter, applied at its own strength "
                                                       "where it wins."),
                AdapterSocket.Input("style", tooltip="The style adapter, applied at its own strength where it wins."),
                io.Combo.Input("pattern", options=list(PATTERNS), default=WRAPPED,
                               tooltip="How the style side's scale S grows over the steps (p = step / steps): S = α·p + "
                                       "β, or S* = (α·p + β) mod α (the official default, which favours style in the "
                                       "first steps, then content until late)."),
                io.Float.Input("alpha", default=DEFAULT_ALPHA, min=0.0, max=10.0, step=0.05,
                               tooltip="α, the slope of S over the run (official 1.5)."),
                io.Float.Input("beta", default=DEFAULT_BETA[WRAPPED], min=0.0, max=10.0, step=0.005,
                               tooltip="β, S at the first step (official: 1.275 with S*, 0.5 with S)."),
                io.Combo.Input("balance", options=list(BALANCES), default=TRIMMED,
                               tooltip="γ, which evens out the two adapters' overall sizes: the official code's "
                                       "trimmed mean of per-layer L1 ratios, or the paper's ratio of summed L1 norms."),
                io.Combo.Input("other_changes", options=list(OTHER_CHANGES), default=LEAVE_OUT,
                               tooltip="Changes K-LoRA cannot switch per step (kxk conv layers, bias and norm diffs): "
                                       "leave them out, as K-LoRA acts on linear layers only, or add both adapters' at "
                                       "their strengths. The report names them."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model that switches the adapters per "
                                                              "layer and step."),
                io.String.Output(display_name="report",
                                 tooltip="γ, how many layers take the content adapter at evenly spaced steps, what "
                                         "was left out or added, and each adapter's binding report."),
            ],
        )

    @classmethod
    def execute(cls, model, content: Adapter, style: Adapter, pattern: str, alpha: float, beta: float, balance: str,
                other_changes: str) -> io.NodeOutput:
        inputs = {"content": merge_input(content, model, "content"), "style": merge_input(style, model, "style")}
        switched, others = switchable(inputs, cc.weight_shapes(model))
        fused = projections(model, {key for layers in switched.values() for key in layers})
        switched = {role: split_projections(layers, fused) for role, layers in switched.items()}
        plan = schedule(switched["content"], switched["style"], alpha, beta, pattern, balance)
        patched = model.clone()
        by_weight: dict[str, list[str]] = {}
        for layer in plan.scores:
            by_weight.setdefault(layer.split(PROJECTION)[0], []).append(layer)
        for key, layers in by_weight.items():
            terms = {f"{role}|{layer}": (found[layer], inputs[role].strength) for role, found in switched.items()
                     for layer in layers if layer in found}
            add_to_forward(patched, key, cc.weight_shapes(model)[key], terms, select_winner(plan, layers, terms))
        publish_call_options(patched)
        if other_changes == ADD_BOTH:
            extra = [other_changes_adapter(inputs[r], keys, r) for r, keys in others.items() if keys]
            patched, _ = apply_patch_groups(patched, None, patches_by_strength(extra, model, None, {})[0])
        return io.NodeOutput(patched, report_text(plan, others, other_changes, inputs))


def report_text(plan: Schedule, others: dict[str, list], other_changes: str, inputs: dict[str, MergeInput]) -> str:
    both = sum(s.content_l1 > 0 and s.style_l1 > 0 for s in plan.scores.values())
    lines = [f"K-LoRA on {len(plan.scores)} layers ({both} changed by both adapters), {plan.pattern}, α {plan.alpha:g}, "
             f"β {plan.beta:g}, γ {plan.gamma:.4f}", *winners_summary(plan, REPORT_STEPS)]
    for role, keys in others.items():
        if keys:
            how = "added at its strength" if other_changes == ADD_BOTH else "not used"
            lines.append(f"{role}: {len(keys)} changes K-LoRA does not switch (kxk conv, bias or norm), {how}: "
                         + ", ".join(keys))
    lines += [line for item in inputs.values() for line in item.forms] + [item.report for item in inputs.values()]
    return "\n".join(lines)
