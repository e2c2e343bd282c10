"""The seam's second module (beside comfy_compat): CLIP text and image features for the features that need them
(IPL, the scores): the text encoders of a CLIP, their projected pooled features, image embeddings, and
differentiable versions of ComfyUI's CLIP text and vision forwards and of the VAE decoder.

ComfyUI runs its CLIP layers without gradients and adds residuals in place; the out-of-place forwards below
run the same modules in the same order with the same attention function. They read ComfyUI's CLIP layer
internals, ``SDClipModel.process_tokens`` and the VAE's decoder module (listed in comfy_compat's docstring): when a
ComfyUI release changes those, this file and comfy_compat.py are the ones to edit.
"""
from __future__ import annotations

import torch

import comfy.ldm.modules.attention
import comfy.ops

def text_encoders(clip) -> dict:
    """{'l': clip_l model, 'g': clip_g model, ...}: ComfyUI names each SD text encoder clip_<key>."""
    model = clip.cond_stage_model
    return {name[len("clip_"):]: module for name, module in model.named_children() if name.startswith("clip_")}


def token_widths(clip) -> dict[str, int]:
    return {key: enc.transformer.get_input_embeddings().weight.shape[1] for key, enc in text_encoders(clip).items()}


def projection_width(clip, key: str) -> int:
    return text_encoders(clip)[key].transformer.text_projection.weight.shape[0]


def _encoder_out_of_place(encoder, x, mask=None):
    """ComfyUI's CLIPEncoder layers with out-of-place residual adds: its CLIPLayer does ``x += ...``, which
    autograd cannot differentiate through. Same modules, same order, same attention function."""
    attention = comfy.ldm.modules.attention.optimized_attention_for_device(x.device, mask=mask is not None,
                                                                          small_input=True)
    for layer in encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def _text_features_out_of_place(transformer, embeds, num_tokens):
    """ComfyUI's CLIP text forward (causal mask, final norm, EOS pooling, projection), differentiable."""
    text_model = transformer.text_model
    x = embeds + comfy.ops.cast_to(text_model.embeddings.position_embedding.weight, dtype=embeds.dtype,
                                   device=embeds.device)
    length = x.shape[1]
    mask = torch.full((length, length), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    x = text_model.final_layer_norm(_encoder_out_of_place(text_model.encoder, x, mask))
    pooled = x[torch.arange(x.shape[0]), torch.tensor(num_tokens) - 1]
    return transformer.text_projection(pooled).float()


def looks_loaded(weight: torch.Tensor) -> bool:
    """Whether a text projection came from the file. ComfyUI builds text encoders with torch.empty and loads with
    strict=False, ignoring a missing text_projection (SD1.5 checkpoints carry none) without recording it: the weight
    is then uninitialised memory, usually zeros, sometimes leftovers (seen: values below 1e-4). A loaded projection is
    finite, not near zero and not mostly zeros. Leftovers of another trained weight would pass: no better test exists
    without a record of the loaded keys."""
    values = weight.detach().float()
    return (bool(torch.isfinite(values).all()) and float(values.abs().max()) > 1e-3
            and float((values == 0).float().mean()) < 0.5)


def has_text_projection(clip, key: str) -> bool:
    return looks_loaded(text_encoders(clip)[key].transformer.text_projection.weight)


def projected_text_features(clip, key: str, prompts: list, require_projection: bool = True):
    """(len(prompts), P) projected pooled text features, differentiable in any inserted vectors.

    ``prompts`` holds one token list per prompt, for encoder ``key`` (ComfyUI's tokenize(...)[key]); the
    first 77-token chunk of each is encoded, all in one batch.
    """
    encoder = text_encoders(clip)[key]
    projection = encoder.transformer.text_projection.weight
    if require_projection and not looks_loaded(projection):
        raise ValueError("this CLIP has no text projection (SD1.5 checkpoints do not carry one): load the text encoder "
                         "with CLIPLoader from a file that includes text_projection, so text and image features share "
                         "one CLIP space")
    clip.load_model()
    ids = [[entry[0] for entry in tokens[0]] for tokens in prompts]
    embeds, _, num_tokens, _ = encoder.process_tokens(ids, projection.device)
    return _text_features_out_of_place(encoder.transformer, embeds, num_tokens)


def clip_vision_embeds(clip_vision, images):
    """(B, P) projected image embeddings of ComfyUI's CLIP vision encoder (no gradient)."""
    with torch.no_grad():
        return clip_vision.encode_image(images)["image_embeds"].float().detach()


def clip_vision_width(clip_vision) -> int:
    return clip_vision.model.visual_projection.weight.shape[0]


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


def vae_decode_with_grad(vae, latent):
    """(B, H, W, 3) images in [0, 1] from VAE-space latents, differentiable (ComfyUI's decode runs without grad)."""
    # a copy: newer ComfyUI's process_output works in place, which autograd refuses on a tensor it saved
    return vae.process_output(vae.first_stage_model.decode(latent).to(torch.float32, copy=True)).movedim(1, -1)


