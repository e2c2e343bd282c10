"""Helpers for in-process tests: realised weights of a patched ModelPatcher."""
from __future__ import annotations

import torch


def patched_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """The weights a ModelPatcher would compute for ``keys``, without touching the shared model.

    The starting point is the unpatched weight: ComfyUI leaves the last loaded clone's patches written into the
    shared weights and keeps the originals in the (shared) backup."""
    import comfy.lora

    state = patcher.model.state_dict()
    out = {}
    for key in keys:
        original = patcher.backup[key].weight if key in patcher.backup else state[key]
        weight = original.detach().to(torch.float32).clone()
        out[key] = comfy.lora.calculate_weight(patcher.patches.get(key, []), weight, key)
    return out


def kohya_module(model_key: str) -> str:
    """'diffusion_model.a.b.weight' -> 'lora_unet_a_b' (ComfyUI's native-name kohya key)."""
    return "lora_unet_" + model_key[len("diffusion_model."):-len(".weight")].replace(".", "_")


def checkpoint_weights(keys, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The tiny SD1.5 checkpoint's own UNet weights (``prefix`` 'cond_stage_model.': its text encoder's), read from
    its file: the independent base for exact checks.

    (A loaded model's state_dict is not: ComfyUI leaves the last loaded clone's patches in the weights.)"""
    import comfy_host
    import model_names
    from safetensors import safe_open

    with safe_open(str(comfy_host.TINY_MODELS_DIR / model_names.TINY_CHECKPOINT_NAME), "pt") as handle:
        return {key: handle.get_tensor(prefix + key) for key in keys}
