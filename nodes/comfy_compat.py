"""The ComfyUI surfaces this pack relies on, in one place.

Everything version-specific lives here, so a ComfyUI release that moves a function is one edit.
Checked against ComfyUI 0.3.75; every name used is a public module of ComfyUI core:
comfy.lora (key maps, load_lora), comfy.weight_adapter (LoRAAdapter), comfy.model_management
(interruption), comfy.utils (ProgressBar), folder_paths (model folders).
"""
from __future__ import annotations

import os

import torch

import comfy.lora
import comfy.model_management
import comfy.utils
import comfy.weight_adapter
import folder_paths

LORA_FOLDER = "loras"
PACK_FOLDER = "content_style_adapters"
ADAPTER_EXTENSIONS = {".safetensors"}


def register_pack_folders() -> None:
    """models/content_style_adapters and models/prompt_mappers, keeping paths extra_model_paths.yaml gave them."""
    for name in (PACK_FOLDER, MAPPER_FOLDER):
        default = os.path.join(folder_paths.models_dir, name)
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.folder_names_and_paths[name] = ([default], set(ADAPTER_EXTENSIONS))
            continue
        paths, extensions = folder_paths.folder_names_and_paths[name]
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


# -- text encoder tokens -------------------------------------------------------------------------

def token_ids(clip, text: str) -> list[int]:
    """The first text encoder's token ids for ``text``, all 77-token chunks flattened, in conditioning order.

    Embedding vectors (textual inversion) stand in the list as -1.
    """
    tokens = clip.tokenize(text)
    first = tokens["l"] if "l" in tokens else tokens[sorted(tokens)[0]]
    return [int(t[0]) if isinstance(t[0], int) else -1 for chunk in first for t in chunk]


def special_token_ids(clip) -> set[int]:
    """Start, end and padding ids: what the tokenizer adds around an empty prompt."""
    return set(token_ids(clip, ""))


# -- sampling hooks --------------------------------------------------------------------------------

def percent_to_sigma(model, percent: float) -> float:
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def attn2_replace_patch(model, key: tuple):
    """The attn2 replacement another pack already set for this transformer (specific key first), or None."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replace.get(key) or replace.get(key[:2])


def set_attn2_replace_patch(model, patch, key: tuple) -> None:
    model.set_model_attn2_replace(patch, key[0], key[1], key[2])


def default_attention(q, k, v, heads: int):
    import comfy.ldm.modules.attention

    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads)


def module_forward(model, module_name: str):
    """The forward a module runs now (another pack's object patch of it included)."""
    return model.get_model_object(f"{module_name}.forward")


def replace_module_forward(model, module_name: str, forward) -> None:
    """Object-patch one module's forward (undone when ComfyUI unpatches the model; weights stay patchable)."""
    model.add_object_patch(f"{module_name}.forward", forward)


def add_outer_sample_wrapper(model, key: str, wrapper) -> None:
    """wrapper(executor, *args, **kwargs) around a whole sampling run."""
    import comfy.patcher_extension

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, wrapper)


# the extra_options keys a patch reads inside attention
EXTRA_HEADS, EXTRA_BLOCK, EXTRA_SIGMAS, EXTRA_COND_OR_UNCOND = "n_heads", "block", "sigmas", "cond_or_uncond"
EXTRA_ACTIVATIONS_SHAPE = "activations_shape"


def around_each_model_call(model, key: str, around) -> None:
    """``around(transformer_options)`` (a context manager) is entered for every UNet call of this model."""
    import comfy.patcher_extension

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        with around(transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)


def with_transformer_option(model_options: dict, key: str, value) -> dict:
    """A copy of model_options whose transformer_options also carry key = value (for one batch of UNet calls)."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), key: value}
    return options


def guider_base():
    """ComfyUI's CFG guider class, to subclass."""
    import comfy.samplers

    return comfy.samplers.CFGGuider


def cfg_prediction(inner_model, x, timestep, negative, positive, cfg: float, model_options: dict, seed):
    """Stock CFG exactly as ComfyUI's CFGGuider computes it (pre/post-CFG hooks included)."""
    import comfy.samplers

    return comfy.samplers.sampling_function(inner_model, x, timestep, negative, positive, cfg,
                                            model_options=model_options, seed=seed)


def cond_prediction(inner_model, cond, x, timestep, model_options: dict):
    """The model's prediction for one conditioning (one UNet pass over the batch)."""
    import comfy.samplers

    return comfy.samplers.calc_cond_batch(inner_model, [cond], x, timestep, model_options)[0]


# -- prompt vectors at the text encoders' input embeddings ----------------------------------------

MAPPER_FOLDER = "prompt_mappers"


def text_encoders(clip) -> dict:
    """{'l': clip_l model, 'g': clip_g model, ...}: ComfyUI names each SD text encoder clip_<key>."""
    model = clip.cond_stage_model
    return {name[len("clip_"):]: module for name, module in model.named_children() if name.startswith("clip_")}


def token_widths(clip) -> dict[str, int]:
    return {key: enc.transformer.get_input_embeddings().weight.shape[1] for key, enc in text_encoders(clip).items()}


def insert_prompt_vectors(clip, template: str, marker: str, vectors: dict) -> dict:
    """Tokens of ``template`` with ``marker`` replaced by one entry per vector, for every text encoder.

    ``vectors[key]`` is (n_ctx, width) for encoder ``key``. Each vector takes one token slot (ComfyUI's
    textual-inversion path); trailing padding is dropped so every chunk keeps its length.
    """
    tokens = clip.tokenize(template.replace("{}", marker))
    empty = clip.tokenize("")
    marker_tokens = clip.tokenize(marker)
    for key, chunks in tokens.items():
        if key not in vectors:
            raise ValueError(f"the mapper has vectors for text encoders {sorted(vectors)}, this CLIP has {sorted(tokens)}")
        special = {entry[0] for entry in empty[key][0]}
        pad = empty[key][0][-1][0]
        ids = [e[0] for e in marker_tokens[key][0] if e[0] not in special]
        tokens[key] = [_replace_marker(chunk, ids, vectors[key], pad, template) for chunk in chunks]
    return tokens


def _replace_marker(chunk: list, marker_ids: list[int], vectors, pad: int, template: str) -> list:
    ids = [e[0] if isinstance(e[0], int) else None for e in chunk]
    starts = [i for i in range(len(ids) - len(marker_ids) + 1) if ids[i:i + len(marker_ids)] == marker_ids]
    if not starts:
        return chunk
    start, extra = starts[0], len(vectors) - len(marker_ids)
    trailing = 0
    while trailing < len(chunk) and chunk[len(chunk) - 1 - trailing][0] == pad:
        trailing += 1
    if trailing - 1 < extra:  # keep one end / pad token
        raise ValueError(f"the prompt {template!r} is too long to take {len(vectors)} prompt vectors")
    entry = chunk[start]
    inserted = [(vector, *entry[1:]) for vector in vectors]
    out = chunk[:start] + inserted + chunk[start + len(marker_ids):]
    return out[: len(chunk)] if extra >= 0 else out + [(pad, *entry[1:])] * (-extra)


def encode_tokens(clip, tokens) -> tuple:
    """(cond (1, T, D), pooled) of ComfyUI's own encoding of these tokens."""
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    return out["cond"], out.get("pooled_output")


def projected_text_features(clip, key: str, tokens_for_key: list, require_projection: bool = True):
    """The text encoder's projected pooled features (1, P), differentiable in any inserted vectors."""
    encoder = text_encoders(clip)[key]
    projection = encoder.transformer.text_projection.weight
    if require_projection and not bool(projection.abs().sum() > 0):
        raise ValueError("this CLIP has no text projection (SD1.5 checkpoints do not carry one): load the text encoder "
                         "with CLIPLoader from a file that includes text_projection, so text and image features share "
                         "one CLIP space")
    clip.load_model()
    ids = [[entry[0] for entry in chunk] for chunk in tokens_for_key[:1]]
    embeds, _, num_tokens, embeds_info = encoder.process_tokens(ids, projection.device)
    outputs = encoder.transformer(None, None, embeds=embeds, num_tokens=num_tokens, dtype=torch.float32,
                                  embeds_info=embeds_info)
    return outputs[2].float()


def projection_width(clip, key: str) -> int:
    return text_encoders(clip)[key].transformer.text_projection.weight.shape[0]


def clip_vision_embeds(clip_vision, images):
    """(B, P) projected image embeddings of ComfyUI's CLIP vision encoder (no gradient)."""
    return clip_vision.encode_image(images)["image_embeds"].float()


def clip_vision_width(clip_vision) -> int:
    return clip_vision.model.visual_projection.weight.shape[0]


def mapper_file_names() -> list[str]:
    return folder_paths.get_filename_list(MAPPER_FOLDER)


def mapper_file_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(MAPPER_FOLDER, name)


def mapper_save_root() -> str:
    return folder_paths.get_folder_paths(MAPPER_FOLDER)[0]
