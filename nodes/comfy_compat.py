"""The ComfyUI surfaces this pack relies on, in one place.

Everything version-specific lives here, so a ComfyUI release that moves a function is one edit.
Checked against ComfyUI 0.3.75; every name used is a public module of ComfyUI core:
comfy.lora (key maps, load_lora), comfy.weight_adapter (LoRAAdapter), comfy.model_management
(interruption), comfy.utils (ProgressBar), folder_paths (model folders).
"""
from __future__ import annotations

import os

import comfy.lora
import comfy.model_management
import comfy.utils
import comfy.weight_adapter
import folder_paths

LORA_FOLDER = "loras"
PACK_FOLDER = "content_style_adapters"
ADAPTER_EXTENSIONS = {".safetensors"}


def register_pack_folder() -> None:
    """models/content_style_adapters, keeping any paths extra_model_paths.yaml already gave the folder."""
    default = os.path.join(folder_paths.models_dir, PACK_FOLDER)
    if PACK_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[PACK_FOLDER] = ([default], set(ADAPTER_EXTENSIONS))
        return
    paths, extensions = folder_paths.folder_names_and_paths[PACK_FOLDER]
    if default not in paths:
        paths.append(default)
    extensions.update(ADAPTER_EXTENSIONS)


def adapter_file_names() -> list[str]:
    """Adapter files: the loras folder, then the pack folder (prefixed with its name)."""
    loras = [n for n in folder_paths.get_filename_list(LORA_FOLDER) if n.endswith(".safetensors")]
    ours = [f"{PACK_FOLDER}/{n}" for n in folder_paths.get_filename_list(PACK_FOLDER)]
    return loras + ours


def adapter_file_path(name: str) -> str:
    if name.startswith(PACK_FOLDER + "/") and folder_paths.get_full_path(PACK_FOLDER, name[len(PACK_FOLDER) + 1:]):
        return folder_paths.get_full_path(PACK_FOLDER, name[len(PACK_FOLDER) + 1:])
    return folder_paths.get_full_path_or_raise(LORA_FOLDER, name)


def lora_save_root() -> str:
    return folder_paths.get_folder_paths(LORA_FOLDER)[0]


def lora_key_map(model=None, clip=None) -> dict:
    """ComfyUI's map from every LoRA module name it understands to the model's weight key."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def weight_shapes(model=None, clip=None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for module in (model.model if model is not None else None, clip.cond_stage_model if clip is not None else None):
        if module is not None:
            shapes.update({k: tuple(v.shape) for k, v in module.state_dict().items()})
    return shapes


def model_name(model) -> str:
    """The model config class ComfyUI detected (SD15, SDXL, ...)."""
    return type(model.model.model_config).__name__


def model_context_dim(model) -> int | None:
    return model.model.model_config.unet_config.get("context_dim")


def lora_weight_adapter(name: str, up, down, alpha):
    """ComfyUI's own LoRA weight adapter for one module, as comfy.lora.load_lora would build it."""
    tensors = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    return comfy.weight_adapter.LoRAAdapter.load(name, tensors, alpha, None)


def comfy_lora_patches(tensors: dict, key_map: dict) -> dict:
    """ComfyUI's stock LoRA loading of a file's tensors (used to compare against)."""
    return comfy.lora.load_lora(tensors, key_map, log_missing=False)


def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


ProgressBar = comfy.utils.ProgressBar
