"""Binding an Adapter to a model, the pure half: every module through the model's key map, shapes checked.

The key map ({module name: model weight key}) and the weight shapes come from the model as plain data
(nodes/model_binding.py reads them from ComfyUI), so this stays free of ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .adapter import BIAS_PARTS, Adapter, LowRank, ModuleTensors, kind_counts

CROSS_ATTENTION_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def _product_shape(t: dict, full: str | None, a: str, b: str, core: str | None = None) -> tuple[int, ...]:
    """The shape of a weight-adapter factor product as comfy/weight_adapter builds it: a full matrix, a @ b, or the
    Tucker form (einsum 'i j k l, j r, i p -> p r k l' of core, b, a)."""
    if full in t:
        return tuple(t[full].shape)
    if core in t:
        return (t[a].shape[1], t[b].shape[1], *t[core].shape[2:])
    return (t[a].shape[0], t[b].shape[1])


def _lora_numel(t: dict) -> int:
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    if "lora_mid.weight" in t:
        return up.shape[0] * down.shape[1] * math.prod(t["lora_mid.weight"].shape[2:])
    return up.shape[0] * down[0].numel()


# kind -> does its weight change fit a weight of this shape? Exactly where ComfyUI's weight adapter would fail to
# reshape (or view) its change to the weight, which it only logs. GLoRA has no such fixed size and is not checked.
WEIGHT_FITS = {
    "lora": lambda t, w: _lora_numel(t) == math.prod(w),
    "loha": lambda t, w: math.prod(_product_shape(t, None, "hada_w1_a", "hada_w1_b", "hada_t1")) == math.prod(w),
    "lokr": lambda t, w: math.prod(_product_shape(t, "lokr_w1", "lokr_w1_a", "lokr_w1_b")) * math.prod(
        _product_shape(t, "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")) == math.prod(w),
    "oft": lambda t, w: t["oft_blocks"].shape[0] * t["oft_blocks"].shape[1] == w[0],
    "boft": lambda t, w: t["oft_blocks"].shape[1] * t["oft_blocks"].shape[2] == w[0],
    "weight diff": lambda t, w: tuple(t["diff"].shape) == w,
    "norm diff": lambda t, w: tuple(t["w_norm"].shape) == w,
    "set weight": lambda t, w: tuple(t["set_weight"].shape) == w,
}


def bias_key(weight_key: str) -> str:
    """The bias a module's bias diff patches, named as ComfyUI's loader names it."""
    return weight_key[: -len(".weight")] + ".bias"


@dataclass
class Binding:
    """Modules that found a weight ({model key: (module, factors or tensors)}) and those that did not."""

    targets: dict[str, tuple[str, LowRank]] = field(default_factory=dict)
    tensor_targets: dict[str, tuple[str, ModuleTensors]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    @property
    def matched_count(self) -> int:
        return len({m for m, _ in self.targets.values()} | {m for m, _ in self.tensor_targets.values()})

    @property
    def kinds(self) -> dict[str, int]:
        return kind_counts(len(self.targets), [kept for _, kept in self.tensor_targets.values()])


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
    patched: dict[str, str] = {}  # model key -> the module that patches it
    unmatched = set()

    def claim(key: str, module: str) -> None:
        if key in patched:
            raise ValueError(f"{adapter.source}: modules '{patched[key]}' and '{module}' both patch {key}")
        patched[key] = module

    for module, factors in adapter.modules.items():
        key = key_map.get(module)
        if not isinstance(key, str) or key not in weight_shapes:
            unmatched.add(module)
            continue
        claim(key, module)
        shape = tuple(weight_shapes[key])
        if not shapes_fit(factors.delta_shape, shape):
            raise ValueError(f"{adapter.source}: module '{module}' does not fit {key}: the adapter changes a "
                             f"{tuple(factors.delta_shape)} weight, the model's is {shape}")
        binding.targets[key] = (module, factors)
    for module, kept in adapter.module_tensors.items():
        key = key_map.get(module)
        if not isinstance(key, str) or key not in weight_shapes:
            unmatched.add(module)
            continue
        for target in [key] * kept.changes_weight + [bias_key(key)] * kept.changes_bias:
            claim(target, module)
        check_tensors_fit(adapter.source, module, kept, key, weight_shapes)
        binding.tensor_targets[key] = (module, kept)
    binding.unmatched = sorted(unmatched)
    return binding


def check_tensors_fit(source: str, module: str, kept: ModuleTensors, key: str, weight_shapes: dict) -> None:
    """Raise ValueError naming the module when its tensors do not fit the model's weight or bias."""
    shape = tuple(weight_shapes[key])
    wrong = [kind for kind in kept.kinds if kind in WEIGHT_FITS and not WEIGHT_FITS[kind](kept.tensors, shape)]
    if wrong:
        raise ValueError(f"{source}: module '{module}' does not fit {key}: its {' and '.join(wrong)} tensors "
                         f"{ {p: tuple(t.shape) for p, t in kept.tensors.items() if t.ndim} } do not make a change of "
                         f"the model's {shape} weight")
    if not kept.changes_bias:
        return
    bias = bias_key(key)
    if bias not in weight_shapes:
        raise ValueError(f"{source}: module '{module}' changes a bias, but {key[: -len('.weight')]} has none in this "
                         f"model")
    wrong = [p for p in BIAS_PARTS if p in kept.tensors and tuple(kept.tensors[p].shape) != tuple(weight_shapes[bias])]
    if wrong:
        raise ValueError(f"{source}: module '{module}' does not fit {bias}: {wrong[0]} is "
                         f"{tuple(kept.tensors[wrong[0]].shape)}, the model's bias is {tuple(weight_shapes[bias])}")
