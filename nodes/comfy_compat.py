"""The ComfyUI surfaces this pack relies on, in one place.

Everything version-specific lives here, so a ComfyUI release that moves a function is one edit.
Checked against ComfyUI 0.3.75; all names used are public modules of ComfyUI core.
"""
from __future__ import annotations

import comfy.lora
import comfy.model_management
import comfy.utils
import folder_paths

ADAPTER_FOLDER = "loras"


def lora_key_map(model=None, clip=None) -> dict:
    """ComfyUI's map from every LoRA module name it understands to the model's weight key."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def comfy_lora_patches(tensors: dict, key_map: dict) -> dict:
    """ComfyUI's own LoRA loader: {model weight key: weight adapter} for the mapped modules."""
    return comfy.lora.load_lora(tensors, key_map, log_missing=False)


def adapter_file_names() -> list[str]:
    return folder_paths.get_filename_list(ADAPTER_FOLDER)


def adapter_file_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, name)


def model_architecture(model) -> str:
    """The model config class name ComfyUI detected (SD15, SDXL, ...)."""
    return type(model.model.model_config).__name__


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


ProgressBar = comfy.utils.ProgressBar
