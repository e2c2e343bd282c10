"""Binding adapters to a ComfyUI model, the ComfyUI half (key map and shapes read from the model; the pure\nhalf is core/binding.py), and turning them into ComfyUI weight patches."""
from __future__ import annotations

from collections import defaultdict

from ..core.adapter import Adapter
from ..core.blocks import block_of, block_of_module, check_block_names, strength_of_block
from ..core.binding import Binding, bind, check_architecture
from . import comfy_compat


def bind_to_model(adapter: Adapter, model, clip=None) -> Binding:
    """Every module of the adapter through ComfyUI's key map for this model (and CLIP)."""
    check_architecture(adapter, comfy_compat.model_name(model), comfy_compat.model_context_dim(model))
    binding = bind(adapter, comfy_compat.lora_key_map(model, clip), comfy_compat.weight_shapes(model, clip))
    if binding.matched_count == 0:
        hint = ("; it has text-encoder modules, so connect the CLIP" if clip is None and
                any(block_of_module(m) == "text_encoder" for m in adapter.modules) else "")
        raise ValueError(f"{adapter.source or 'adapter'}: this adapter does not match this model "
                         f"({comfy_compat.model_name(model)}): none of its {len(adapter.modules)} modules is in the "
                         f"model's key map (first: {sorted(adapter.modules)[:3]}){hint}")
    return binding


def describe_binding(adapter: Adapter, binding: Binding, model) -> str:
    total = binding.matched_count + len(binding.unmatched)
    line = (f"{adapter.source or adapter.method} ({adapter.role}, strength {adapter.strength:g}): "
            f"{binding.matched_count} of {total} modules mapped onto {comfy_compat.model_name(model)}")
    if binding.unmatched:
        line += "\n  unmapped modules: " + ", ".join(binding.unmatched)
    return line


def patches_by_strength(adapters: list[Adapter], model, clip, block_strengths: dict[str, float]):
    """[(strength, {model key: ComfyUI LoRA weight adapter})], one group per adapter and strength, and a report per
    adapter. Groups are never merged across adapters: two adapters patching one weight must both stay."""
    groups: list[tuple[float, dict]] = []
    reports = []
    model_blocks = {block_of(k) for k in comfy_compat.weight_shapes(model)}
    check_block_names(block_strengths, model_blocks)
    for index, adapter in enumerate(adapters):
        binding = bind_to_model(adapter, model, clip)
        reports.append(describe_binding(adapter, binding, model))
        by_strength: dict[float, dict] = defaultdict(dict)
        for key, (module, factors) in binding.targets.items():
            strength = adapter.strength * strength_of_block(block_of(key), block_strengths)
            if strength != 0:
                name = f"csa{index}.{module}"
                by_strength[strength][key] = comfy_compat.lora_weight_adapter(name, factors.up, factors.down,
                                                                              factors.alpha)
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
