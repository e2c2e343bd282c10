"""Binding adapters to a ComfyUI model, the ComfyUI half (key map and shapes read from the model; the pure\nhalf is core/binding.py), and turning them into ComfyUI weight patches or into merge terms."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ..core import metadata as META
from ..core.adapter import Adapter, LowRank, ModuleTensors
from ..core.blocks import block_of, block_of_module, check_block_names, strength_of_block
from ..core.binding import (Binding, bias_key, bind, check_architecture, family_of_names, slice_of,
                            weight_key_of)
from ..core.dense import carried_diffs, exact_lowrank, sum_diffs
from ..core.layouts import generic_module_name
from ..core.merge import Term
from . import comfy_compat


def bind_to_model(adapter: Adapter, model, clip=None) -> Binding:
    """Every module of the adapter through ComfyUI's key map for this model (and CLIP)."""
    check_architecture(adapter, comfy_compat.model_name(model), comfy_compat.model_context_dim(model))
    binding = bind(adapter, comfy_compat.lora_key_map(model, clip), comfy_compat.weight_shapes(model, clip))
    if binding.matched_count == 0:
        names = adapter.module_names
        hint = ("; it has text-encoder modules, so connect the CLIP" if clip is None and
                any(block_of_module(m) == "text_encoder" for m in names) else "")
        made_for = family_of_names(names)
        if made_for is not None and made_for != family_of_names(comfy_compat.weight_shapes(model)):
            hint = f"; its module names are those of {made_for}, the model is {comfy_compat.model_name(model)}" + hint
        raise ValueError(f"{adapter.source or 'adapter'}: this adapter does not match this model "
                         f"({comfy_compat.model_name(model)}): none of its {len(names)} modules is in the "
                         f"model's key map (first: {names[:3]}){hint}")
    return binding


def describe_binding(adapter: Adapter, binding: Binding, model) -> str:
    """What mapped (with its kinds), then every module and file key that is not used, with the reason."""
    total = binding.matched_count + len(binding.unmatched)
    kinds = ", ".join(f"{kind} {count}" for kind, count in binding.kinds.items())
    line = (f"{adapter.source or adapter.method} ({adapter.role}, strength {adapter.strength:g}): "
            f"{binding.matched_count} of {total} modules mapped onto {comfy_compat.model_name(model)} ({kinds})")
    if adapter.ignored_keys:
        line += f"; {len(adapter.ignored_keys)} keys of the file not used (below)"
    if binding.unmatched:
        line += "\n  not used, no target in this model: " + ", ".join(binding.unmatched)
    for reason in sorted(set(adapter.ignored_keys.values())):
        line += f"\n  not used, {reason}: " + ", ".join(k for k, r in adapter.ignored_keys.items() if r == reason)
    return line


def whole_targets(binding: Binding, model) -> dict[str, tuple[str, LowRank]]:
    """{weight key: (module, factors)}: the binding's low-rank targets with slices of fused weights joined exactly."""
    return binding.whole_weight_targets(comfy_compat.weight_shapes(model))


def kept_patches(name: str, module: str, kept: ModuleTensors, key, source: str) -> dict:
    """ComfyUI's patches for a module kept as its tensors; an error when ComfyUI's loader made none for its weight or
    bias (so nothing it skips goes unnoticed)."""
    patches = comfy_compat.module_patches(name, kept.tensors, key)  # key: a weight key or a slice of one
    expected = {key} if kept.changes_weight else set()
    expected |= {bias_key(key)} if kept.changes_bias else set()
    missing = sorted(expected - set(patches))
    if missing:
        raise ValueError(f"{source}: ComfyUI's loader made no patch for {missing} from module '{module}' "
                         f"({' + '.join(kept.kinds)}); this ComfyUI version does not read that kind")
    return patches


def dense_changes(adapter: Adapter, binding: Binding, model) -> dict[str, tuple[ModuleTensors, torch.Tensor]]:
    """{model key: (tensors, change)}: what each module kept as tensors does to each weight and bias at strength 1,
    computed by ComfyUI (its own weight adapters, float32 factors) on the model's base weights held in float64. A
    slice of a fused weight changes that slice; the change is the whole weight's, zero outside the slices."""
    changes = {}
    for key, (module, kept) in binding.tensor_targets.items():
        patches = kept_patches(META.PREFIX + module, module, kept, key, adapter.source)
        bases = comfy_compat.base_weights(model, {weight_key_of(t) for t in patches})
        for target, patch in patches.items():
            weight_key, part = weight_key_of(target), slice_of(target)
            base = bases[weight_key].to(torch.float64)
            if part is None:
                changes[weight_key] = (kept, comfy_compat.weight_with_patch(patch, base, weight_key) - base)
                continue
            piece = base.narrow(*part).clone()
            whole = changes[weight_key][1] if weight_key in changes else torch.zeros_like(base)
            whole.narrow(*part).copy_(comfy_compat.weight_with_patch(patch, piece, weight_key) - piece)
            changes[weight_key] = (kept, whole)
    return changes


@dataclass(frozen=True)
class MergeInput:
    """An adapter bound to a model, ready to merge at any weight: per weight key its low-rank factors (shaped like the
    weight) or the exact low-rank form of its ΔW at strength 1 (kinds the pack does not factor), the vector changes
    (biases, norm weights) carried as diffs, a line per layer merged through its ΔW, and its binding report line."""

    role: str
    strength: float
    factors: dict[str, LowRank]
    vectors: dict[str, torch.Tensor]
    forms: list[str]
    report: str


def merge_input(adapter: Adapter, model, role: str) -> MergeInput:
    binding = bind_to_model(adapter, model)
    shapes = comfy_compat.weight_shapes(model)
    factors = {key: f.shaped_like(shapes[key]) for key, (_, f) in whole_targets(binding, model).items()}
    vectors, forms = {}, []
    for key, (kept, change) in dense_changes(adapter, binding, model).items():
        if change.ndim < 2:
            vectors[key] = change
            continue
        form = exact_lowrank(change)
        forms.append(f"{key} ({adapter.source or role}): {form.describe(kept.weight_kinds)}")
        factors[key] = form.factors
    return MergeInput(role, adapter.strength, factors, vectors, forms, describe_binding(adapter, binding, model))


def weighted_terms(inputs: list[MergeInput], lambdas: dict[str, float]):
    """({model key: merge terms}, {model key: summed vector change}), each input weighted by λ of its role times its
    strength."""
    terms: dict[str, list[Term]] = {}
    vectors: dict[str, list] = {}
    for item in inputs:
        weight = lambdas[item.role] * item.strength
        for key, factors in item.factors.items():
            terms.setdefault(key, []).append(Term(factors, weight, item.role))
        for key, change in item.vectors.items():
            vectors.setdefault(key, []).append((change, weight))
    return terms, sum_diffs(vectors)


def merged_adapter(layers: dict, vectors: dict[str, torch.Tensor], source: str, base: str = "unknown") -> Adapter:
    """The merged adapter: each merged layer's factors, and the summed vector changes as ComfyUI diffs."""
    return Adapter(modules={generic_module_name(k): layer.factors for k, layer in layers.items()},
                   module_tensors={generic_module_name(k): kept for k, kept in carried_diffs(vectors).items()},
                   role="generic", method="qr-merge", base=base, source=source)


def patches_by_strength(adapters: list[Adapter], model, clip, block_strengths: dict[str, float]):
    """[(strength, {model key: ComfyUI patch})], one group per adapter and strength, and a report per adapter. Groups
    are never merged across adapters: two adapters patching one weight must both stay."""
    groups: list[tuple[float, dict]] = []
    reports = []
    model_blocks = {block_of(k) for k in comfy_compat.weight_shapes(model)}
    check_block_names(block_strengths, model_blocks)
    for index, adapter in enumerate(adapters):
        binding = bind_to_model(adapter, model, clip)
        reports.append(describe_binding(adapter, binding, model))
        by_strength: dict[float, dict] = defaultdict(dict)
        for key, (module, factors) in binding.targets.items():  # slices of fused weights as ComfyUI patches them
            strength = adapter.strength * strength_of_block(block_of(weight_key_of(key)), block_strengths)
            if strength != 0:
                name = f"csa{index}.{module}"
                by_strength[strength][key] = comfy_compat.lora_weight_adapter(name, factors.up, factors.down,
                                                                              factors.alpha)
        for key, (module, kept) in binding.tensor_targets.items():
            strength = adapter.strength * strength_of_block(block_of(weight_key_of(key)), block_strengths)
            if strength != 0:
                by_strength[strength].update(kept_patches(f"csa{index}.{module}", module, kept, key, adapter.source))
        groups.extend(by_strength.items())
    return groups, "\n".join(reports)


def apply_patch_groups(model, clip, groups: list[tuple[float, dict]]):
    """Clones of the model (and CLIP) with every (strength, patches) group added; the inputs when there is none."""
    if not groups:
        return model, clip
    model = model.clone()
    clip = clip.clone() if clip is not None else None
    for strength, patches in groups:
        model.add_patches(patches, strength)
        if clip is not None:
            clip.add_patches(patches, strength)
    return model, clip
