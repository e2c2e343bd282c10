"""The version-sensitive seam between this pack and ComfyUI: one edit when a ComfyUI release moves something.

Checked against ComfyUI 0.3.75 (the tests' host) and read against the newest ComfyUI source available (0.33.0,
spot checks of 0.38.1): docs/comfyui-host-audit.md lists every symbol used, and where releases differ this module
probes the object (``call_with_supported``, ``static_patcher``) instead of reading a version. Only this module names ComfyUI's model folders, key maps, weight layout,
progress and interruption, and its sampler and wrapper hooks. Node files and the support modules
(``model_binding``, ``runtime_adapters``, ``training``) reach ComfyUI through it, apart from the objects
ComfyUI hands them (MODEL, CLIP, VAE, CLIP_VISION) and ``comfy.samplers.CFGGuider``, which the guider
subclasses.

Public surfaces used: ``folder_paths``; ``comfy.lora.model_lora_keys_unet/clip``, ``load_lora``, ``calculate_weight``;
``comfy.weight_adapter.LoRAAdapter`` (subclassed: ``LowRankWeightAdapter``); ``comfy.model_management`` (interruption, load_model_gpu);
``comfy.utils.ProgressBar``; ``comfy.patcher_extension`` (WrappersMP, merge_nested_dicts);
``comfy.samplers`` (sampling_function, calc_cond_batch, encode_model_conds); ``comfy.sampler_helpers.convert_cond``;
``comfy.sample.sample``;
``comfy.ldm.modules.attention.optimized_attention``; ``comfy_execution.utils.get_executing_context`` and
``server.PromptServer.send_progress_text`` (the training loss as text on the node);
ModelPatcher methods (clone, add_patches, add_object_patch, get_model_object, set_model_attn2_replace,
add_wrapper_with_key, model_options); CLIP ``tokenize``; BaseModel ``extra_conds``, ``apply_model`` and its
``model_sampling.sigmas`` (the training engine's noise levels).

Private internals the pack reads, and why (each is one line to change if ComfyUI renames it):

- ``ModelPatcher.backup`` (here, ``base_weights``): after sampling, ComfyUI leaves the last loaded clone's
  LoRA written into the shared weights; the originals are in the backup, which conversions must read.
- ``ModelPatcher.wrappers`` (here, ``denoised``): a direct UNet call outside a sampler must merge the
  patcher's APPLY_MODEL wrappers into transformer_options the way a sampler does.
- ``transformer_options["patches_replace"]["attn2"]`` (here, ``attn2_replace_patch``): to chain to an attn2
  replacement another pack set before ours instead of replacing it.
- ComfyUI's weight adapters log and swallow their errors, leaving the weight unchanged (here, ``weight_with_patch``
  listens for those log records): a merge must not take a failed computation for a zero change.
- ``model.model.model_config.unet_config`` (``model_context_dim``, ``has_pooled_conditioning``): the
  cross-attention width and pooled conditioning tell SD1.x / SD2.x / SDXL apart.
- ``torch.nn.Module._parameters`` / ``_buffers`` (``training.make_autograd_safe``): models loaded inside a
  server hold inference tensors, which autograd refuses; frozen weights on a gradient path are swapped
  for normal tensors of the same values.
- ``SDClipModel.process_tokens`` and the CLIP text / vision transformer layers (``clip_features.py``, the seam's
  other module): IPL and the scores differentiate through the text and image encoders, which ComfyUI only runs
  without gradients and with in-place residual adds.
- The torch modules behind MODEL / VAE / CLIP / CLIP_VISION (``model.model``, ``vae.first_stage_model``,
  ``clip.cond_stage_model``, ``clip_vision.model``: ``torch_modules``): training makes their frozen weights
  autograd-safe; ``latent_format`` (``latent_channels``) sizes a preview's latent.
- FLUX's run-time hooks (Apply Localized Residual's LAG): ``transformer_options["patches_replace"]["dit"]``
  (``dit_block_replace_patch``: chains to another pack's double-block replacement), the
  ``optimized_attention_override`` option ComfyUI's ``wrap_attn`` reads (``attention_override``), the
  ``block_type`` / ``block_index`` options FLUX sets while a block runs, the double blocks' ``flipped_img_txt``
  and the model's ``patch_size``.

A test (tests/unit/test_code_structure.py) fails when a module outside the seam names one of these internals.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import weakref

import torch

import comfy.clip_vision
import comfy.ldm.modules.attention
import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
import comfy.lora
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import comfy.weight_adapter
import comfy_execution.utils
import folder_paths
from PIL import Image

from ..core.training import ADDED, FLOW

# -- folders -------------------------------------------------------------------------------------

LORA_FOLDER = "loras"
PACK_FOLDER = "content_style_adapters"
MAPPER_FOLDER = "prompt_mappers"
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


def mapper_file_names() -> list[str]:
    return folder_paths.get_filename_list(MAPPER_FOLDER)


def mapper_file_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(MAPPER_FOLDER, name)


def mapper_save_root() -> str:
    return folder_paths.get_folder_paths(MAPPER_FOLDER)[0]


def input_directory() -> str:
    return folder_paths.get_input_directory()


# -- key maps, weights and model kinds -------------------------------------------------------------

def lora_key_map(model=None, clip=None) -> dict:
    """ComfyUI's map from every LoRA module name it understands to the model's weight key."""
    key_map: dict = {}
    if model is not None:
        key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


class LowRankWeightAdapter(comfy.weight_adapter.LoRAAdapter):
    """ComfyUI's LoRA weight adapter, bit for bit, minus one full-size pass where the patch's scale
    (strength x alpha / rank) is exactly 1, as in every QR Merge output: LoRAAdapter multiplies the dense product by
    that scale before adding it, a copy of the whole weight that changes nothing (issue 21). DoRA, LoCon mid weights,
    reshapes and every other scale go through LoRAAdapter's own code."""

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        up, down, alpha, mid, dora_scale, reshape = self.weights[:6]
        scale = strength * (1.0 if alpha is None else alpha / down.shape[0])
        if scale != 1.0 or mid is not None or dora_scale is not None or reshape is not None:
            return super().calculate_weight(weight, key, strength, strength_model, offset, function,
                                            intermediate_dtype, original_weight)
        try:
            product = torch.mm(comfy.model_management.cast_to_device(up, weight.device, intermediate_dtype).flatten(1),
                               comfy.model_management.cast_to_device(down, weight.device, intermediate_dtype).flatten(1))
            weight += function(product.reshape(weight.shape).type(weight.dtype))
        except Exception as error:  # as LoRAAdapter: log it and leave the weight (weight_with_patch listens)
            logging.error(f"ERROR {self.name} {key} {error}")
        return weight


def lora_weight_adapter(name: str, up, down, alpha):
    """A LoRA weight adapter for one module, as comfy.lora.load_lora would build it (LowRankWeightAdapter: ComfyUI's
    own, one pass cheaper at scale 1)."""
    tensors = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    return LowRankWeightAdapter.load(name, tensors, alpha, None)


def module_patches(name: str, tensors: dict[str, torch.Tensor], weight_key: str) -> dict:
    """ComfyUI's own patches for one module's tensors ({part: tensor}, parts spelled as ComfyUI's key suffixes), built
    by its LoRA loader exactly as LoraLoader builds them: {model key: weight adapter (LoHa, LoKr, OFT, ...) or
    ("diff", ...) / ("set", ...)}; a bias diff patches '<module>.bias'."""
    return comfy.lora.load_lora({f"{name}.{part}": t for part, t in tensors.items()}, {name: weight_key},
                                log_missing=False)


class _LoggedErrors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def weight_with_patch(patch, weight: torch.Tensor, key: str) -> torch.Tensor:
    """``weight`` with one patch at strength 1, computed by ComfyUI's calculate_weight (factors in float32, as ComfyUI
    patches weights; the sum in ``weight``'s dtype). ComfyUI's weight adapters log their errors and leave the weight
    unchanged; here an error is raised instead, so no change is taken as zero by mistake."""
    errors = _LoggedErrors()
    logging.getLogger().addHandler(errors)
    try:
        result = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], weight.clone(), key)
    finally:
        logging.getLogger().removeHandler(errors)
    if errors.messages:
        raise ValueError(f"ComfyUI could not compute the change of {key}: {errors.messages[0]}")
    return result


_SHAPES_BY_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def weight_shapes(model=None, clip=None) -> dict[str, tuple[int, ...]]:
    """{state-dict key: shape} of the MODEL's diffusion model and the CLIP's text encoders. A loaded module's
    shapes never change, so each module's are read once (state_dict() walks every submodule) and kept while it
    lives."""
    shapes = {}
    for module in (model.model if model is not None else None, clip.cond_stage_model if clip is not None else None):
        if module is not None:
            if module not in _SHAPES_BY_MODULE:
                _SHAPES_BY_MODULE[module] = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            shapes.update(_SHAPES_BY_MODULE[module])
    return shapes


def base_weights(model, keys) -> dict[str, torch.Tensor]:
    """The model's own weights for these keys, without LoRA patches ComfyUI may have left in place.

    After sampling, ComfyUI keeps the last loaded clone's patches written into the shared weights; clones
    share the backup of the originals, so a patched key is read from the backup."""
    return unpatched_weights(model, keys, model_name(model))


def unpatched_weights(patcher, keys, owner: str) -> dict[str, torch.Tensor]:
    """A ModelPatcher's weights for these keys, read from its backup where a patch is written in (``owner`` names
    the model in the error)."""
    state = patcher.model.state_dict()
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"{owner} has no weight {missing[0]!r}")
    return {k: (patcher.backup[k].weight if k in patcher.backup else state[k]).detach() for k in keys}


def model_name(model) -> str:
    """The model config class ComfyUI detected (SD15, SDXL, ...)."""
    return type(model.model.model_config).__name__


def model_context_dim(model) -> int | None:
    return model.model.model_config.unet_config.get("context_dim")


def checkpoint_units(model) -> list[str]:
    """Module names (relative to the patcher's model) of the blocks the diffusion model calls one by one: a UNet's
    layers inside each input / middle / output block (ComfyUI's UNet iterates a block's layers itself, so the
    block's own forward never runs), a DiT's blocks (FLUX double and single blocks, SD3 joint blocks)."""
    root = model.model.diffusion_model
    units = []
    for name, child in root.named_children():
        elements = [(f"{name}.{i}", m) for i, m in enumerate(child)] if isinstance(child, torch.nn.ModuleList) else \
            [(name, child)] if isinstance(child, torch.nn.Sequential) and name == "middle_block" else []
        for path, element in elements:
            if isinstance(element, torch.nn.Sequential):
                units += [f"diffusion_model.{path}.{i}" for i in range(len(element))]
            else:
                units.append(f"diffusion_model.{path}")
    return units


# -- the torch modules behind ComfyUI's objects ---------------------------------------------------------------

def torch_modules(model=None, vae=None, clip_vision=None, clip=None) -> list[torch.nn.Module]:
    """The torch modules behind ComfyUI's MODEL (its BaseModel), VAE, CLIP_VISION and CLIP objects."""
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


def latent_channels(model) -> int:
    """Channels of the model's latent space (4 for SD, 16 for FLUX / SD3)."""
    return model.get_model_object("latent_format").latent_channels


def is_unet(model) -> bool:
    """A ComfyUI UNet (SD1.x, SD2.x, SDXL), not a DiT (FLUX, SD3, ...): a probe on the diffusion model's class."""
    return isinstance(model.model.diffusion_model, openaimodel.UNetModel)


def has_pooled_conditioning(model) -> bool:
    return model.model.model_config.unet_config.get("adm_in_channels") is not None


def clip_vision_kind(clip_vision) -> str:
    """'dinov2', 'clip', 'siglip', 'clip-unprojected' or 'unknown', from the model class ComfyUI's loader built
    (comfy.clip_vision.IMAGE_ENCODERS; SigLIP is the CLIP class with output_layernorm set)."""
    model = getattr(clip_vision, "model", None)
    if isinstance(model, comfy.clip_vision.IMAGE_ENCODERS["dinov2"]):
        return "dinov2"
    if isinstance(model, comfy.clip_vision.IMAGE_ENCODERS["clip_vision_model"]):
        if model.vision_model.output_layernorm:
            return "siglip"
        return "clip" if isinstance(model.visual_projection, torch.nn.Linear) else "clip-unprojected"
    return "unknown"


def to_model_space(model, latent):
    """VAE latents -> the scaled latents the UNet works on (SD1.5: x 0.18215)."""
    return model.model.process_latent_in(latent)


def from_model_space(model, latent):
    """The UNet's latents -> VAE latents."""
    return model.model.process_latent_out(latent)


# -- progress and cancel ---------------------------------------------------------------------------

def throw_if_interrupted() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


def progress_steps(total: int):
    """A callback for each unit of long work: moves ComfyUI's progress bar and stops cleanly on cancel."""
    bar = comfy.utils.ProgressBar(total)

    def step(*_):
        throw_if_interrupted()
        bar.update(1)
    return step


# -- text encoder tokens -------------------------------------------------------------------------

T5_TOKENS = "t5xxl"  # the token stream FLUX's cross-attention context is made of


def token_ids(clip, text: str, stream: str | None = None) -> list[int]:
    """One text encoder's token ids for ``text``, all chunks flattened, in conditioning order: ``stream`` ('l',
    't5xxl', ...), by default the CLIP-L one (or the first the tokenizer gives).

    Embedding vectors (textual inversion) stand in the list as -1.
    """
    tokens = clip.tokenize(text)
    if stream is not None and stream not in tokens:
        raise ValueError(f"this CLIP gives no {stream!r} tokens (it gives {', '.join(sorted(tokens))}): connect the text "
                         f"encoder the model was made with")
    first = tokens[stream] if stream is not None else tokens["l"] if "l" in tokens else tokens[sorted(tokens)[0]]
    return [int(t[0]) if isinstance(t[0], int) else -1 for chunk in first for t in chunk]


def special_token_ids(clip, stream: str | None = None) -> set[int]:
    """Start, end and padding ids: what the tokenizer adds around an empty prompt."""
    return set(token_ids(clip, "", stream))


TOKEN_EMBEDDING_SUFFIX = "embeddings.token_embedding.weight"  # CLIP's token-embedding matrix (vocab, width)


def token_embedding_key(clip) -> str:
    """The CLIP's token-embedding weight key, for text encoders with exactly one (SD1.x, the world model); refuses
    the others by name (SDXL has two CLIPs whose rows would have to train together)."""
    keys = sorted(k for k in weight_shapes(clip=clip) if k.endswith(TOKEN_EMBEDDING_SUFFIX))
    if len(keys) != 1:
        raise ValueError(f"learning a token embedding needs a text encoder with one token-embedding matrix (SD1.x); "
                         f"this CLIP has {len(keys)}: {keys}")
    return keys[0]


def token_embedding_rows(clip, key: str, ids: tuple[int, ...]) -> tuple[torch.Tensor, torch.dtype]:
    """(len(ids), width) float32 copies of those rows of the CLIP's token embedding, as the CLIP encodes them (with the
    weight patches it carries), and the weight's dtype."""
    clip.load_model()
    weight = comfy.utils.get_attr(clip.cond_stage_model, key[: -len(".weight")]).weight
    return weight[list(ids)].detach().float().clone(), weight.dtype


def clip_base_weights(clip, keys) -> dict[str, torch.Tensor]:
    """The CLIP's own weights for these keys, without the patches ComfyUI may have left in place (as base_weights)."""
    return unpatched_weights(clip.patcher, keys, "the text encoder")


def in_place_safe_autograd():
    """A context for autograd through ComfyUI forwards that add residuals in place (its CLIP layers do ``x += ...``,
    which autograd refuses: the add changes a tensor saved for the backward pass). Inside it every saved tensor on the
    gradient path is saved as a copy (weights and their casts are not), so ComfyUI's own encode stays differentiable,
    with all its options."""
    return torch.autograd.graph.saved_tensors_hooks(
        lambda saved: saved.clone() if saved.requires_grad else saved, lambda saved: saved)


def differentiable_forward(model):
    """A context for a training step's UNet call: nothing for ComfyUI's UNets (their forward autograd takes as it
    is), in_place_safe_autograd for the other diffusion models (FLUX's and other DiTs' blocks add residuals in
    place). A probe on the model's class, not a version."""
    if is_unet(model):
        return contextlib.nullcontext()
    return in_place_safe_autograd()


def tokens_with_vectors(clip, text: str, vectors: dict[int, torch.Tensor]) -> dict:
    """``clip.tokenize(text)`` with every token id in ``vectors`` replaced by that embedding vector, as ComfyUI feeds
    textual-inversion embeddings to the text encoder: its encoding is then differentiable in the vectors."""
    return {encoder: [[(vectors[t[0]], *t[1:]) if isinstance(t[0], int) and t[0] in vectors else t for t in chunk]
                      for chunk in chunks] for encoder, chunks in clip.tokenize(text).items()}


# -- sampler and wrapper hooks ---------------------------------------------------------------------

# the extra_options keys a patch reads inside attention
EXTRA_HEADS, EXTRA_SIGMAS, EXTRA_COND_OR_UNCOND = "n_heads", "sigmas", "cond_or_uncond"
EXTRA_ACTIVATIONS_SHAPE = "activations_shape"


SAMPLE_SIGMAS = "sample_sigmas"  # transformer option: the running sampler's whole schedule (N + 1 sigmas, last 0)


def sampler_step(options: dict) -> tuple[int, int] | None:
    """(n, N): the sampler step running now, 0 .. N-1, as the place of the call's sigma in the run's schedule (the
    nearest one); None outside a sampler (a direct UNet call has no schedule)."""
    schedule, sigmas = options.get(SAMPLE_SIGMAS), options.get(EXTRA_SIGMAS)
    if schedule is None or sigmas is None or len(schedule) < 2:
        return None
    current = sigmas.flatten()[0].to(schedule.device, schedule.dtype)
    return int((schedule[:-1] - current).abs().argmin()), len(schedule) - 1


def percent_to_sigma(model, percent: float) -> float:
    return float(model.get_model_object("model_sampling").percent_to_sigma(percent))


def attn2_replace_patch(model, key: tuple):
    """The attn2 replacement another pack already set for this transformer (specific key first), or None."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return replace.get(key) or replace.get(key[:2])


def set_attn2_replace_patch(model, patch, key: tuple) -> None:
    model.set_model_attn2_replace(patch, key[0], key[1], key[2])


def default_attention(q, k, v, heads: int):
    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads)


def module_forward(model, module_name: str):
    """The forward a module runs now (another pack's object patch of it included)."""
    return model.get_model_object(f"{module_name}.forward")


def replace_module_forward(model, module_name: str, forward) -> None:
    """Object-patch one module's forward (undone when ComfyUI unpatches the model; weights stay patchable)."""
    model.add_object_patch(f"{module_name}.forward", forward)


DIT_BLOCK_REPLACE = "dit"  # patches_replace group of DiT blocks: ("double_block", i) / ("single_block", i) in FLUX
ATTENTION_OVERRIDE = "optimized_attention_override"  # transformer option: (func, *args, **kwargs) around attention
BLOCK_TYPE, BLOCK_INDEX = "block_type", "block_index"  # transformer options FLUX sets while a block runs


def dit_block_replace_patch(model, block_name: str, index: int):
    """The replacement another pack already set for a DiT block ('double_block', i), or None."""
    replace = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(DIT_BLOCK_REPLACE, {})
    return replace.get((block_name, index))


def set_dit_block_replace_patch(model, patch, block_name: str, index: int) -> None:
    """``patch(args, {"original_block": run})`` runs in place of the block; args hold img, txt, vec, pe,
    transformer_options."""
    model.set_model_patch_replace(patch, DIT_BLOCK_REPLACE, block_name, index)


def attention_override(model):
    """The attention override another pack already set on this model, or None."""
    return transformer_option(model, ATTENTION_OVERRIDE)


def set_attention_override(model, override) -> None:
    """``override(func, q, k, v, heads, **kwargs)`` around every optimized_attention call of the model (the hook
    ComfyUI's wrap_attn reads from the call's transformer_options)."""
    set_transformer_option(model, ATTENTION_OVERRIDE, override)


def joint_attention_text_first(model) -> bool:
    """Whether the model's double blocks put the text tokens before the image tokens in joint attention (FLUX;
    some variants flip the order)."""
    blocks = getattr(model.model.diffusion_model, "double_blocks", [])
    return not any(getattr(block, "flipped_img_txt", False) for block in blocks)


def dit_patch_size(model) -> int:
    """The side of the latent patch a DiT turns into one image token (FLUX: 2)."""
    return int(getattr(model.model.diffusion_model, "patch_size", 1))


def set_transformer_option(model, key: str, value) -> None:
    """Store a value in the model's transformer_options (deep-copied into every clone of the model)."""
    model.model_options.setdefault("transformer_options", {})[key] = value


def transformer_option(model, key: str, default=None):
    return model.model_options.get("transformer_options", {}).get(key, default)


def with_transformer_option(model_options: dict, key: str, value) -> dict:
    """A copy of model_options whose transformer_options also carry key = value (for one batch of UNet calls)."""
    options = dict(model_options)
    options["transformer_options"] = {**model_options.get("transformer_options", {}), key: value}
    return options


def add_outer_sample_wrapper(model, key: str, wrapper) -> None:
    """``wrapper(executor, *args, **kwargs)`` around a whole sampling run; ``sampling_options(executor)`` reads
    that run's model_options."""
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, wrapper)


def sampling_options(executor) -> dict:
    """The model_options of the sampling run an OUTER_SAMPLE wrapper is wrapping (its guider's)."""
    return executor.class_obj.model_options


def sampled_patcher(executor):
    """The ModelPatcher an OUTER_SAMPLE wrapper's run samples (its guider's)."""
    return executor.class_obj.model_patcher


def around_each_model_call(model, key: str, around) -> None:
    """``around(transformer_options)`` (a context manager) is entered for every UNet call of this model."""
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        with around(transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, wrapper)


def cfg_prediction(inner_model, x, timestep, negative, positive, cfg: float, model_options: dict, seed):
    """Stock CFG exactly as ComfyUI's CFGGuider computes it (pre/post-CFG hooks included)."""
    return comfy.samplers.sampling_function(inner_model, x, timestep, negative, positive, cfg,
                                            model_options=model_options, seed=seed)


def cond_prediction(inner_model, cond, x, timestep, model_options: dict):
    """The model's prediction for one conditioning (one UNet pass over the batch)."""
    return comfy.samplers.calc_cond_batch(inner_model, [cond], x, timestep, model_options)[0]


def load_for_direct_calls(model) -> None:
    """Load the model (and apply its weight and object patches) before calling it outside a sampler."""
    comfy.model_management.load_model_gpu(model)


def denoised(model, latent, sigma, cond, transformer_options: dict):
    """The model's x0 prediction for model-space latents at noise level sigma (the raw BaseModel call).

    ``cond`` is the cross-attention tensor, or a dict of apply_model's conditioning inputs (``batch_conds``).
    The patcher's own transformer options and wrappers come first, as a sampler merges them: its APPLY_MODEL
    wrappers (runtime adapter switching) and attention patches only run when they are in the options."""
    options = dict(model.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(options.get("wrappers", {}), model.wrappers)
    options.update(transformer_options)
    conds = cond if isinstance(cond, dict) else {"c_crossattn": cond}
    return model.model.apply_model(latent, sigma, transformer_options=options, **conds)


def sampler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SAMPLERS)


def scheduler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def call_with_supported(function, *args, **optional):
    """``function(*args, **the optional keywords it accepts)``: a probe on the callable's own signature, for
    parameters newer ComfyUI releases added (the newest-host audit in docs/comfyui-host-audit.md lists them)."""
    parameters = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return function(*args, **{k: v for k, v in optional.items() if takes_any or k in parameters})


# Newer ComfyUI passes a latent's downscale ratios to fix_empty_latent_channels (KSampler, SamplerCustomAdvanced).
LATENT_DOWNSCALE_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def empty_latent_fixed(model, latent: dict):
    """comfy.sample.fix_empty_latent_channels as the stock samplers of this ComfyUI call it."""
    return call_with_supported(comfy.sample.fix_empty_latent_channels, model, latent["samples"],
                               **{key: latent.get(key) for key in LATENT_DOWNSCALE_KEYS})


def static_patcher(model):
    """A patcher whose weights live in its modules, as training needs (it swaps them for autograd-safe copies).

    Newer ComfyUI may hand nodes a dynamic patcher (weights cast and patched per forward: CUDA with comfy-aimdo);
    it is cloned static where its clone() takes disable_dynamic. On 0.3.75 and on the CPU every patcher is static."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if not callable(is_dynamic) or not is_dynamic():
        return model
    if "disable_dynamic" not in inspect.signature(model.clone).parameters:
        raise ValueError("this model is loaded with ComfyUI's dynamic VRAM, which this ComfyUI cannot clone static for "
                         "training; start ComfyUI with --disable-dynamic-vram to train in it")
    try:
        return model.clone(disable_dynamic=True)
    except RuntimeError as error:
        raise ValueError(f"this model is loaded with ComfyUI's dynamic VRAM and could not be cloned static for "
                         f"training ({error}); start ComfyUI with --disable-dynamic-vram to train in it") from error


def sample_like_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent: dict, callback):
    """nodes.common_ksampler at denoise 1 (same noise, same call), with the caller's step callback instead of a bar
    per run (0.3.75's common_ksampler makes its own ProgressBar and takes no callback)."""
    latent_image = empty_latent_fixed(model, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                               denoise=1.0, noise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True,
                               seed=seed)


def sample_like_sampler_custom_advanced(guider, seed, steps, sampler_name, scheduler, latent: dict, callback):
    """SamplerCustomAdvanced with RandomNoise(seed), KSamplerSelect(sampler_name), BasicScheduler(steps, denoise 1)."""
    latent_image = empty_latent_fixed(guider.model_patcher, latent)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), scheduler,
                                             steps).cpu()
    samples = guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler_name), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback, disable_pbar=True, seed=seed)
    return samples.to(comfy.model_management.intermediate_device())


def decode_images(vae, samples):
    """VAEDecode: (B, H, W, 3) images; video VAEs' (B, T, H, W, 3) become one batch of frames."""
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])[..., :3]


def model_conds(model, conditioning, latent) -> dict:
    """apply_model's conditioning inputs for one CONDITIONING (c_crossattn; y for SDXL-like models), made as a
    sampler makes them for this latent's size. Values are ComfyUI cond objects; ``batch_conds`` joins them."""
    conds = comfy.sampler_helpers.convert_cond(conditioning)[:1]
    encoded = comfy.samplers.encode_model_conds(model.model.extra_conds, conds, latent, latent.device, "positive",
                                                latent_image=latent)
    return dict(encoded[0]["model_conds"])


def batch_conds(per_sample: list[dict]) -> dict:
    """One sample's model_conds each -> a batch's apply_model inputs (ComfyUI's own concat pads token lengths)."""
    first = per_sample[0]
    return {key: first[key].concat([c[key] for c in per_sample[1:]]) for key in first}


# -- training -----------------------------------------------------------------------------------------------

ADDED_NOISE_SAMPLINGS = ("EPS", "V_PREDICTION")  # x_σ = x0 + σ ε
FLOW_SAMPLINGS = ("CONST",)  # x_t = (1 − t) x0 + t ε: FLUX, SD3, and the other rectified-flow models


def noising(model) -> str:
    """How the model noises a latent, as the training engine names it (core.training.NOISINGS); refuses samplings
    the engine does not parameterise (EDM's v, Stable Cascade, ...), naming them."""
    kinds = [cls.__name__ for cls in type(model.get_model_object("model_sampling")).__mro__]
    if any(kind in ADDED_NOISE_SAMPLINGS for kind in kinds):
        return ADDED
    if any(kind in FLOW_SAMPLINGS for kind in kinds):
        return FLOW
    raise ValueError(f"training supports models sampled as x0 + σ·noise (SD1.x, SD2.x, SDXL: EPS, V_PREDICTION) or on "
                     f"the flow path (1 − t)·x0 + t·noise (FLUX, SD3: CONST); this model's sampling is {kinds[:3]}")


def sigma_table(model) -> torch.Tensor:
    """The model's noise levels, its own table (ascending): one per discrete timestep, or a flow model's shifted t
    grid (FLUX: 10,000 levels), drawn uniformly by the engine."""
    noising(model)  # refuses samplings the engine does not parameterise
    sampling = model.get_model_object("model_sampling")
    if not hasattr(sampling, "sigmas"):
        raise ValueError(f"this model's sampling {type(sampling).__name__} has no table of noise levels to train on")
    return sampling.sigmas.detach().float().clone()


def sample(model, positive, negative, latent, seed: int, steps: int, cfg: float):
    """KSampler (Euler, normal schedule) from an empty latent; the noise comes from a private generator seeded
    like ComfyUI's (same values), so the server's global generator is left alone."""
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def training_progress(total: int):
    """``update(step, loss, preview=None)`` after each training step: moves ComfyUI's progress bar (with a preview
    image, (H, W, 3) in [0, 1], when given), shows the step and loss as text on the node, stops cleanly on cancel."""
    bar = comfy.utils.ProgressBar(total)
    context = comfy_execution.utils.get_executing_context()

    def update(step: int, loss: float, preview=None) -> None:
        throw_if_interrupted()
        image = None
        if preview is not None:
            image = ("PNG", Image.fromarray((preview.clamp(0, 1) * 255).round().byte().cpu().numpy()), 512)
        bar.update_absolute(step + 1, total, image)
        server = sys.modules.get("server")  # only a running ComfyUI server has imported it (never import it here)
        prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
        if context is not None and prompt_server is not None:
            prompt_server.send_progress_text(f"step {step + 1}/{total}  loss {loss:.4f}", context.node_id)
    return update
