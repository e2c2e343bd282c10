"""How LoRA files name their tensors: '<module><suffix>', where the suffix says which factor it is.

The table below covers the layouts in the wild (kohya, diffusers/PEFT, ComfyUI generic, the old
diffusers attention-processor form, QR-LoRA). Module names are returned untouched; mapping them onto a
model is the job of the model's key map.

    key                                                   -> (module,                               part)
    lora_unet_input_blocks_1_1_proj_in.lora_down.weight   -> (lora_unet_input_blocks_1_1_proj_in,   down)
    unet.down_blocks.0.attentions.0.proj_in.lora_B.weight -> (unet.down_blocks.0.attentions.0.proj_in, up)
    diffusion_model.out.2.alpha                           -> (diffusion_model.out.2,                alpha)
    x.to_q.lora.delta_r.weight                            -> (x.to_q,                               delta_r)
"""
from __future__ import annotations

import torch

PART_SUFFIXES: dict[str, str] = {
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_mid.weight": "mid",
    ".lora_B.default.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.weight": "down",
    ".lora.up.weight": "up",
    ".lora.down.weight": "down",
    "_lora.up.weight": "up",
    "_lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora.q.weight": "q",
    ".lora.delta_r.weight": "delta_r",
    ".lora.base_r.weight": "base_r",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
}
_SUFFIXES_LONGEST_FIRST = sorted(PART_SUFFIXES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """(module, part) for a LoRA tensor key, or None when the suffix is not a known LoRA part."""
    for suffix in _SUFFIXES_LONGEST_FIRST:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], PART_SUFFIXES[suffix]
    return None


def group_by_module(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a file's tensors per module: ({module: {part: tensor}}, keys that are no LoRA part)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        modules.setdefault(module, {})[part] = tensor
    return modules, sorted(unknown)


def keys_of_modules(tensors: dict[str, torch.Tensor], modules: set[str]) -> dict[str, torch.Tensor]:
    """The subset of a file's tensors that belong to the given modules."""
    kept = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is not None and split[0] in modules:
            kept[key] = tensor
    return kept
