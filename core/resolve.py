"""Binding an Adapter to a model: every module through the model's key map, shapes checked.

The key map ({module name: model weight key}) and the weight shapes come from the model, as plain data,
so this stays free of ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .adapter import Adapter, LowRank
from .formats import DIFFUSERS_UNET_ROOTS

CROSS_ATTENTION_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


@dataclass
class Binding:
    """Modules that found a weight ({model key: (module, factors)}) and those that did not."""

    targets: dict[str, tuple[str, LowRank]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    @property
    def matched_count(self) -> int:
        return len(self.targets)


def family(width: int | None) -> str:
    return CROSS_ATTENTION_FAMILIES.get(width, f"an unknown model (cross-attention width {width})")


def check_architecture(adapter: Adapter, model_name: str, context_dim: int | None) -> None:
    """Refuse an adapter whose cross-attention width says it was made for another model family."""
    width = adapter.cross_attention_width()
    if width is not None and context_dim is not None and width != context_dim:
        raise ValueError(f"{adapter.source or 'adapter'}: made for {family(width)} (cross-attention width {width}), "
                         f"but the model is {model_name} (width {context_dim})")


def shapes_fit(delta_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Equal, or a linear factorisation of a 1x1 conv weight (same out dim, same element count)."""
    if tuple(delta_shape) == tuple(weight_shape):
        return True
    return delta_shape[0] == weight_shape[0] and math.prod(delta_shape) == math.prod(weight_shape)


def bind(adapter: Adapter, key_map: dict, weight_shapes: dict[str, tuple[int, ...]]) -> Binding:
    binding = Binding()
    for module, factors in adapter.modules.items():
        key = key_map.get(module)
        if not isinstance(key, str) or key not in weight_shapes:
            binding.unmatched.append(module)
            continue
        if key in binding.targets:
            raise ValueError(f"{adapter.source}: modules '{binding.targets[key][0]}' and '{module}' both patch {key}")
        shape = tuple(weight_shapes[key])
        if not shapes_fit(factors.delta_shape, shape):
            raise ValueError(f"{adapter.source}: module '{module}' does not fit {key}: the adapter changes a "
                             f"{tuple(factors.delta_shape)} weight, the model's is {shape}")
        binding.targets[key] = (module, factors)
    binding.unmatched.sort()
    return binding


DIFFUSERS_ROOTS = tuple(root.replace(".", "_") for root in DIFFUSERS_UNET_ROOTS)  # as kohya spells them
KEY_FORMS = ("comfy", "kohya")


def file_names_for(model_keys, key_map: dict, form: str) -> dict[str, str]:
    """{model weight key: module name to write}, inverting the model's key map.

    'comfy' gives ComfyUI's generic names (diffusion_model.<module>, text_encoders.<module>); 'kohya' gives
    lora_unet_<diffusers path> (the native path where the model has no diffusers name) and lora_te_ for one
    text encoder, lora_te1_ / lora_te2_ for two.
    """
    if form not in KEY_FORMS:
        raise ValueError(f"key form must be one of {KEY_FORMS}, got {form!r}")
    wanted = set(model_keys)
    candidates: dict[str, list[str]] = {k: [] for k in wanted}
    for name, key in key_map.items():
        if isinstance(key, str) and key in wanted:
            candidates[key].append(name)
    two_encoders = any(isinstance(k, str) and k.startswith("clip_g.") for k in key_map.values())
    names = {}
    for key, options in candidates.items():
        chosen = _choose_name(options, form, two_encoders)
        if chosen is None:
            raise ValueError(f"the model's key map has no {form} name for {key}")
        names[key] = chosen
    return names


def _choose_name(options: list[str], form: str, two_encoders: bool) -> str | None:
    if form == "comfy":
        generic = [n for n in options if n.startswith(("diffusion_model.", "text_encoders."))]
        return min(generic, key=len) if generic else None
    unet = [n for n in options if n.startswith("lora_unet_")]
    if unet:
        diffusers = [n for n in unet if n[len("lora_unet_"):].startswith(DIFFUSERS_ROOTS)]
        return sorted(diffusers or unet)[0]
    te_prefixes = ("lora_te1_", "lora_te2_") if two_encoders else ("lora_te_",)
    te = sorted(n for n in options if n.startswith(te_prefixes))
    return te[0] if te else None


def generic_module_name(model_key: str) -> str:
    """ComfyUI's generic module name for a model weight key (what its key map accepts everywhere)."""
    stem = model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key
    return stem if stem.startswith("diffusion_model.") else "text_encoders." + stem
