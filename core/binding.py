"""Binding an Adapter to a model, the pure half: every module through the model's key map, shapes checked.

The key map ({module name: model weight key}) and the weight shapes come from the model as plain data
(nodes/model_binding.py reads them from ComfyUI), so this stays free of ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .adapter import Adapter, LowRank

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
