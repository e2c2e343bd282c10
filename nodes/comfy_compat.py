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


def base_weights(model, keys) -> dict[str, torch.Tensor]:
    """The model's own weights for these keys, without LoRA patches ComfyUI may have left in place.

    After sampling, ComfyUI keeps the last loaded clone's patches written into the shared weights; clones
    share the backup of the originals, so a patched key is read from the backup."""
    state = model.model.state_dict()
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"{model_name(model)} has no weight {missing[0]!r}")
    return {k: (model.backup[k].weight if k in model.backup else state[k]).detach() for k in keys}


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


def progress_steps(total: int):
    """A callback for each unit of long work: moves ComfyUI's progress bar and stops cleanly on cancel."""
    bar = comfy.utils.ProgressBar(total)

    def step(*_):
        throw_if_interrupted()
        bar.update(1)
    return step


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
    if template.count("{}") != 1:
        raise ValueError(f"the template {template!r} must have exactly one {{}} placeholder for the prompt vectors; "
                         f"it has {template.count('{}')}")
    tokens = clip.tokenize(template.replace("{}", marker))
    empty = clip.tokenize("")
    marker_tokens = clip.tokenize(marker)
    for key, chunks in tokens.items():
        if key not in vectors:
            raise ValueError(f"the mapper has vectors for text encoders {sorted(vectors)}, this CLIP has {sorted(tokens)}")
        special = {entry[0] for entry in empty[key][0]}
        pad = empty[key][0][-1][0]
        ids = [e[0] for e in marker_tokens[key][0] if e[0] not in special]
        replaced = [_replace_marker(chunk, ids, vectors[key], pad, template) for chunk in chunks]
        if all(new is old for new, old in zip(replaced, chunks)):
            raise ValueError(f"the tokenizer split the {{}} of the template {template!r} so the prompt vectors found "
                             f"no place; put spaces around {{}}")
        tokens[key] = replaced
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


def projected_text_features(clip, key: str, prompts: list, require_projection: bool = True):
    """(len(prompts), P) projected pooled text features, differentiable in any inserted vectors.

    ``prompts`` holds one token list per prompt, for encoder ``key`` (ComfyUI's tokenize(...)[key]); the
    first 77-token chunk of each is encoded, all in one batch.
    """
    encoder = text_encoders(clip)[key]
    projection = encoder.transformer.text_projection.weight
    if require_projection and not bool(projection.abs().sum() > 0):
        raise ValueError("this CLIP has no text projection (SD1.5 checkpoints do not carry one): load the text encoder "
                         "with CLIPLoader from a file that includes text_projection, so text and image features share "
                         "one CLIP space")
    clip.load_model()
    ids = [[entry[0] for entry in tokens[0]] for tokens in prompts]
    embeds, _, num_tokens, _ = encoder.process_tokens(ids, projection.device)
    return _text_features_out_of_place(encoder.transformer, embeds, num_tokens)


def _encoder_out_of_place(encoder, x, mask=None):
    """ComfyUI's CLIPEncoder layers with out-of-place residual adds: its CLIPLayer does ``x += ...``, which
    autograd cannot differentiate through. Same modules, same order, same attention function."""
    import comfy.ldm.modules.attention

    attention = comfy.ldm.modules.attention.optimized_attention_for_device(x.device, mask=mask is not None,
                                                                          small_input=True)
    for layer in encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def _text_features_out_of_place(transformer, embeds, num_tokens):
    """ComfyUI's CLIP text forward (causal mask, final norm, EOS pooling, projection), differentiable."""
    import comfy.ops

    text_model = transformer.text_model
    x = embeds + comfy.ops.cast_to(text_model.embeddings.position_embedding.weight, dtype=embeds.dtype,
                                   device=embeds.device)
    length = x.shape[1]
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    x = text_model.final_layer_norm(_encoder_out_of_place(text_model.encoder, x, mask))
    pooled = x[torch.arange(x.shape[0]), torch.tensor(num_tokens) - 1]
    return transformer.text_projection(pooled).float()


def projection_width(clip, key: str) -> int:
    return text_encoders(clip)[key].transformer.text_projection.weight.shape[0]


def clip_vision_embeds(clip_vision, images):
    """(B, P) projected image embeddings of ComfyUI's CLIP vision encoder (no gradient)."""
    with torch.no_grad():
        return clip_vision.encode_image(images)["image_embeds"].float().detach()


def clip_vision_width(clip_vision) -> int:
    return clip_vision.model.visual_projection.weight.shape[0]


def mapper_file_names() -> list[str]:
    return folder_paths.get_filename_list(MAPPER_FOLDER)


def mapper_file_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(MAPPER_FOLDER, name)


def mapper_save_root() -> str:
    return folder_paths.get_folder_paths(MAPPER_FOLDER)[0]


# -- training inside a node -------------------------------------------------------------------------

def grad_enabled():
    """ComfyUI runs every node under torch.inference_mode(); training needs autograd back (nodes_train does too)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def make_autograd_safe(*modules) -> None:
    """Freeze these modules and make their weights usable on a gradient path.

    Inside ComfyUI, models are loaded under torch.inference_mode(), so their parameters are inference
    tensors, which autograd refuses to save ("Inference tensors cannot be saved for backward"). The frozen
    models that gradients flow through (UNet, VAE decoder, image and text encoders) get normal-tensor
    copies of the same values; ComfyUI's own weight patching keeps working (it reads and writes by key).
    This touches the modules every clone shares, deliberately: it changes the tensor kind, never a value, so
    other graphs see the same weights; private copies would double the memory of every model trained against.
    """
    with torch.inference_mode(False):
        for root in modules:
            for module in root.modules():
                for name, param in list(module._parameters.items()):
                    if param is None:
                        continue
                    if param.is_inference():
                        module._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
                    else:
                        param.requires_grad_(False)
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None and buffer.is_inference():
                        module._buffers[name] = buffer.clone()


def training_modules(model=None, vae=None, clip_vision=None, clip=None) -> list:
    """The torch modules behind ComfyUI's MODEL, VAE, CLIP_VISION and CLIP objects."""
    found = []
    if model is not None:
        found.append(model.model)
    if vae is not None:
        found.append(vae.first_stage_model)
    if clip_vision is not None:
        found.append(clip_vision.model)
    if clip is not None:
        found.append(clip.cond_stage_model)
    return found


def input_directory() -> str:
    return folder_paths.get_input_directory()


def clip_vision_embeds_with_grad(clip_vision, images):
    """Projected image embeddings, differentiable in the images.

    Same resize, crop and normalisation as comfy.clip_vision.clip_preprocess, minus its rounding to 8-bit
    levels, which would zero every gradient.
    """
    size = clip_vision.image_size
    pixels = images[..., :3].movedim(-1, 1)
    scale = size / min(pixels.shape[2], pixels.shape[3])
    pixels = torch.nn.functional.interpolate(pixels, size=(round(scale * pixels.shape[2]), round(scale * pixels.shape[3])),
                                             mode="bicubic", antialias=True)
    top, left = (pixels.shape[2] - size) // 2, (pixels.shape[3] - size) // 2
    pixels = pixels[:, :, top:top + size, left:left + size].clamp(0, 1)
    mean = torch.tensor(clip_vision.image_mean, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(clip_vision.image_std, dtype=pixels.dtype).view(1, 3, 1, 1)
    vision = clip_vision.model.vision_model
    if vision.output_layernorm:
        raise ValueError("training through the image encoder needs a CLIP ViT vision model (not SigLIP or DINOv2)")
    x = _encoder_out_of_place(vision.encoder, vision.pre_layrnorm(vision.embeddings((pixels - mean) / std)))
    return clip_vision.model.visual_projection(vision.post_layernorm(x[:, 0, :])).float()


def vae_encode(vae, images):
    with torch.no_grad():
        return vae.encode(images[..., :3]).detach()


def vae_decode_with_grad(vae, latent):
    """(B, H, W, 3) images in [0, 1] from VAE-space latents, differentiable (ComfyUI's decode runs without grad)."""
    return vae.process_output(vae.first_stage_model.decode(latent).float()).movedim(1, -1)


def denoised(model, latent, sigma, cond, transformer_options: dict):
    """The model's x0 prediction for model-space latents at noise level sigma (the raw BaseModel call).

    The patcher's own transformer options and wrappers come first, as a sampler merges them: its APPLY_MODEL
    wrappers (runtime adapter switching) and attention patches only run when they are in the options."""
    import comfy.patcher_extension

    options = dict(model.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(options.get("wrappers", {}), model.wrappers)
    options.update(transformer_options)
    return model.model.apply_model(latent, sigma, c_crossattn=cond, transformer_options=options)


def to_model_space(model, latent):
    """VAE latents -> the scaled latents the UNet works on (SD1.5: x 0.18215)."""
    return model.model.process_latent_in(latent)


def from_model_space(model, latent):
    """The UNet's latents -> VAE latents."""
    return model.model.process_latent_out(latent)


def load_for_training(model) -> None:
    """Load the model (and apply its weight and object patches) before calling it directly."""
    comfy.model_management.load_model_gpu(model)


def has_pooled_conditioning(model) -> bool:
    return model.model.model_config.unet_config.get("adm_in_channels") is not None
