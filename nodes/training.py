"""The ComfyUI side of training inside a node: autograd back on, frozen models usable on a gradient path.

ComfyUI runs every node under ``torch.inference_mode()`` and loads models there, so their weights are
inference tensors; training nodes switch autograd back on and give the frozen modules that gradients
flow through normal-tensor copies of their weights (ComfyUI's own nodes_train does the same dance).
"""
from __future__ import annotations

import contextlib

import torch


def grad_enabled() -> contextlib.ExitStack:
    """Autograd on inside a node (ComfyUI runs nodes under torch.inference_mode())."""
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
    Reads torch's private ``Module._parameters`` / ``_buffers`` (listed in comfy_compat's docstring).
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


def torch_modules(model=None, vae=None, clip_vision=None, clip=None) -> list:
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


def vae_encode(vae, images) -> torch.Tensor:
    """VAE latents of (B, H, W, C) images, no gradient (training targets)."""
    with torch.no_grad():
        return vae.encode(images[..., :3]).detach()
