"""Binding an Adapter to a model, the pure half: every module through the model's key map, shapes checked.

The key map ({module name: model weight key}) and the weight shapes come from the model as plain data
(nodes/model_binding.py reads them from ComfyUI), so this stays free of ComfyUI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

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


# -- targets: a whole weight, or a slice of a fused one ------------------------------------------------------
#
# ComfyUI's key map sends some module names to a slice of a fused weight: (weight key, (dim, offset, size)), e.g. a
# diffusers FLUX LoRA's to_q / to_k / to_v onto thirds of double_blocks.N.img_attn.qkv, and the single blocks' to_q /
# to_k / to_v / proj_mlp onto parts of linear1. A target is that tuple or a weight key; ComfyUI's patch dicts and
# ModelPatcher.add_patches take both as keys.

# A third element is a function ComfyUI applies to the change (FLUX's norm_out.linear: swap_scale_shift, which swaps
# the two halves of the rows), with no slice: (weight key, None, function).

Slice = tuple[int, int, int]  # (dim, offset, size): weight.narrow(dim, offset, size)


def normal_target(value):
    """A key-map value as a hashable target: the weight key, (key, slice) or (key, None, function); None for
    anything else."""
    if isinstance(value, str):
        return value
    if not (isinstance(value, tuple) and len(value) >= 2 and isinstance(value[0], str)):
        return None
    part = value[1]
    if part is not None and not (isinstance(part, (tuple, list)) and len(part) == 3
                                 and all(isinstance(v, int) for v in part)):
        return None
    return (value[0], None if part is None else tuple(part), *value[2:])


def weight_key_of(target) -> str:
    return target if isinstance(target, str) else target[0]


def slice_of(target) -> Slice | None:
    return None if isinstance(target, str) else target[1]


def change_function(target):
    """The function ComfyUI applies to this target's change (None: the change as it is)."""
    return target[2] if isinstance(target, tuple) and len(target) > 2 else None


def target_shape(target, weight_shapes: dict) -> tuple[int, ...]:
    """The shape a target's change has: the weight's, or its slice's."""
    shape = list(weight_shapes[weight_key_of(target)])
    part = slice_of(target)
    if part is not None:
        shape[part[0]] = part[2]
    return tuple(shape)


def is_target(target, weight_shapes: dict) -> bool:
    """A (normal) target this model has: a weight key, or a slice inside one, or one with a change function."""
    if target is None or weight_key_of(target) not in weight_shapes:
        return False
    if slice_of(target) is None:
        return True
    dim, offset, size = slice_of(target)
    shape = weight_shapes[weight_key_of(target)]
    return 0 <= dim < len(shape) and offset >= 0 and size > 0 and offset + size <= shape[dim]


def fuse_slices(weight_shape: tuple[int, ...], parts: list[tuple[Slice, LowRank]]) -> LowRank:
    """One whole-weight LowRank equal to the slices' changes side by side (zero elsewhere), exactly: each slice's up
    (rows, for a dim-0 slice) or down (columns, for dim 1) is placed at its offset in zeros, the scaled factors stand
    side by side, ΔW = Σ_i embed(up_i) embed(down_i). Keeps the slices' common alpha / rank scale when they share one
    (as ComfyUI applies it: after the product), else folds each scale into its up."""
    if len(weight_shape) != 2:
        raise ValueError(f"slices of a {len(weight_shape)}-D weight cannot be fused (linear weights only)")
    scales = {factors.scale for _, factors in parts}
    shared = scales.pop() if len(scales) == 1 else None
    ups, downs = [], []
    for (dim, offset, size), factors in parts:
        up, down = factors.up.flatten(1), factors.down.flatten(1)
        if shared is None:
            up = up * factors.scale
        if dim == 0:
            up = torch.zeros(weight_shape[0], up.shape[1], dtype=up.dtype).index_copy(
                0, torch.arange(offset, offset + size), up)
        else:
            down = torch.zeros(down.shape[0], weight_shape[1], dtype=down.dtype).index_copy(
                1, torch.arange(offset, offset + size), down)
        ups.append(up)
        downs.append(down)
    up, down = torch.cat(ups, 1), torch.cat(downs, 0)
    alpha = None if shared is None or shared == 1.0 else shared * down.shape[0]
    return LowRank(up=up, down=down, alpha=alpha)


def overlapping(a: Slice | None, b: Slice | None) -> bool:
    """Two targets of one weight overlap: either is the whole weight, or their slices cross on one dim."""
    if a is None or b is None or a[0] != b[0]:
        return True
    return a[1] < b[1] + b[2] and b[1] < a[1] + a[2]


@dataclass
class Binding:
    """Modules that found a weight ({target: (module, factors or tensors)}, a target being a weight key or a slice
    of one) and those that did not."""

    targets: dict[object, tuple[str, LowRank]] = field(default_factory=dict)
    tensor_targets: dict[object, tuple[str, ModuleTensors]] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    @property
    def sliced(self) -> dict[str, list[str]]:
        """{fused weight key: the modules that patch slices of it}."""
        found: dict[str, list[str]] = {}
        for target, (module, _) in [*self.targets.items(), *self.tensor_targets.items()]:
            if slice_of(target) is not None:
                found.setdefault(weight_key_of(target), []).append(module)
        return found

    def whole_weight_targets(self, weight_shapes: dict) -> dict[str, tuple[str, LowRank]]:
        """{weight key: (module or 'a + b + c', factors)}: the low-rank targets with every fused weight's slices
        joined into one exact LowRank of the whole weight (fuse_slices), what merges, conversions, run-time adapters
        and saved files work on."""
        whole: dict[str, tuple[str, LowRank]] = {}
        slices: dict[str, list[tuple[str, Slice, LowRank]]] = {}
        for target, (module, factors) in self.targets.items():
            function = change_function(target)
            if slice_of(target) is None:  # ComfyUI's change function (a row swap) acts on up's rows alike
                whole[weight_key_of(target)] = (module, factors if function is None else
                                                LowRank(up=function(factors.up), down=factors.down, alpha=factors.alpha))
            else:
                slices.setdefault(weight_key_of(target), []).append((module, slice_of(target), factors))
        for key, parts in slices.items():
            parts.sort(key=lambda part: part[1])
            whole[key] = (" + ".join(m for m, _, _ in parts),
                          fuse_slices(tuple(weight_shapes[key]), [(part, f) for _, part, f in parts]))
        return whole

    @property
    def matched_count(self) -> int:
        return len({m for m, _ in self.targets.values()} | {m for m, _ in self.tensor_targets.values()})

    @property
    def kinds(self) -> dict[str, int]:
        return kind_counts(len(self.targets), [kept for _, kept in self.tensor_targets.values()])


# Module-name fragments that say which architecture an adapter was made for (any layout's spelling), first match wins.
NAME_FAMILIES = (
    ("FLUX", ("double_blocks", "single_blocks", "single_transformer_blocks")),
    ("SD3 / MMDiT", ("joint_blocks", "context_block", "x_block")),
    ("a UNet model (SD1.x / SD2.x / SDXL)", ("input_blocks", "output_blocks", "middle_block", "down_blocks",
                                              "up_blocks", "mid_block")),
)


def family_of_names(names) -> str | None:
    """The architecture an adapter's module names belong to, or None when they name none of NAME_FAMILIES."""
    for family_name, fragments in NAME_FAMILIES:
        if any(fragment in name for name in names for fragment in fragments):
            return family_name
    return None


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
    patched: dict[str, list[tuple[Slice | None, str]]] = {}  # weight key -> (slice or whole, module) patching it
    unmatched = set()

    def claim(target, module: str) -> None:
        key, part = weight_key_of(target), slice_of(target)
        for other_part, other in patched.get(key, []):
            if overlapping(part, other_part):
                where = key if part is None and other_part is None else f"{key} (slices {other_part} and {part})"
                raise ValueError(f"{adapter.source}: modules '{other}' and '{module}' both patch {where}")
        patched.setdefault(key, []).append((part, module))

    for module, factors in adapter.modules.items():
        target = normal_target(key_map.get(module))
        if not is_target(target, weight_shapes):
            unmatched.add(module)
            continue
        claim(target, module)
        shape = target_shape(target, weight_shapes)
        if not shapes_fit(factors.delta_shape, shape):
            where = weight_key_of(target) + ("" if slice_of(target) is None else f" slice {slice_of(target)}")
            raise ValueError(f"{adapter.source}: module '{module}' does not fit {where}: the adapter changes a "
                             f"{tuple(factors.delta_shape)} weight, the model's is {shape}")
        binding.targets[target] = (module, factors)
    for module, kept in adapter.module_tensors.items():
        target = normal_target(key_map.get(module))
        if not is_target(target, weight_shapes):
            unmatched.add(module)
            continue
        if not isinstance(target, str) and kept.changes_bias:
            raise ValueError(f"{adapter.source}: module '{module}' changes a bias, but it targets {target[:2]} (a "
                             f"slice of a fused weight, or a transformed change), whose bias ComfyUI's loader cannot "
                             f"patch (it drops it)")
        if kept.changes_weight:
            claim(target, module)
        if kept.changes_bias:
            claim(bias_key(weight_key_of(target)), module)
        check_tensors_fit(adapter.source, module, kept, target, weight_shapes)
        binding.tensor_targets[target] = (module, kept)
    binding.unmatched = sorted(unmatched)
    return binding


def check_tensors_fit(source: str, module: str, kept: ModuleTensors, target, weight_shapes: dict) -> None:
    """Raise ValueError naming the module when its tensors do not fit the model's weight (or its slice) or bias."""
    shape, key = target_shape(target, weight_shapes), weight_key_of(target)
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
