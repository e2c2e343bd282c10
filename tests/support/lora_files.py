"""Builds real LoRA files of every layout the pack reads, with their dense reference deltas.

Module names are spelled from hand-written tables (not from the pack's own code), so a test that loads
these files checks the pack's key handling against an independent source.
"""
from __future__ import annotations

import math

import torch

# Tiny SD1.5 UNet (one level): ComfyUI block -> diffusers block.
TINY_DIFFUSERS_BLOCKS = {
    "input_blocks.1.1": "down_blocks.0.attentions.0",
    "middle_block.1": "mid_block.attentions.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "input_blocks.1.0": "down_blocks.0.resnets.0",
    "output_blocks.0.0": "up_blocks.0.resnets.0",
    "output_blocks.1.0": "up_blocks.0.resnets.1",
}
RESNET_PARTS = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj"}


def diffusers_path(native: str) -> str:
    """'input_blocks.1.1.transformer_blocks.0.attn1.to_q' -> 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'."""
    for comfy_block, diffusers_block in TINY_DIFFUSERS_BLOCKS.items():
        if native.startswith(comfy_block + "."):
            rest = native[len(comfy_block) + 1:]
            return f"{diffusers_block}.{RESNET_PARTS.get(rest, rest)}"
    raise KeyError(native)


def module_name(native: str, layout: str) -> str:
    """The module name a file of this layout uses for a native UNet module."""
    if layout in ("kohya", "qr-kohya"):
        return "lora_unet_" + native.replace(".", "_")
    if layout == "kohya-diffusers":
        return "lora_unet_" + diffusers_path(native).replace(".", "_")
    if layout in ("comfy", "qr"):
        return "diffusion_model." + native
    if layout == "peft":
        return "unet." + diffusers_path(native)
    if layout == "b4m":
        return "unet.unet." + diffusers_path(native)
    if layout == "processor":
        return "unet." + diffusers_path(native).replace(".to_", ".processor.to_").replace(".to_out.0", ".to_out")
    raise ValueError(layout)


FACTOR_KEYS = {  # layout -> (up suffix, down suffix, writes alpha)
    "kohya": (".lora_up.weight", ".lora_down.weight", True),
    "kohya-diffusers": (".lora_up.weight", ".lora_down.weight", True),
    "comfy": (".lora_up.weight", ".lora_down.weight", True),
    "peft": (".lora_B.weight", ".lora_A.weight", False),
    "b4m": (".lora_B.weight", ".lora_A.weight", False),
    "processor": ("_lora.up.weight", "_lora.down.weight", False),
    "qr": (".lora.q.weight", ".lora.delta_r.weight", False),
}


def random_factors(weight_shape, rank: int, generator: torch.Generator, conv_kernel_in_down: bool = True):
    out_dim, in_dim, *kernel = weight_shape
    if kernel and conv_kernel_in_down:
        down = torch.randn(rank, in_dim, *kernel, generator=generator) / math.sqrt(in_dim * math.prod(kernel))
        up = torch.randn(out_dim, rank, 1, 1, generator=generator)
    else:
        down = torch.randn(rank, in_dim * math.prod(kernel), generator=generator) / math.sqrt(in_dim)
        up = torch.randn(out_dim, rank, generator=generator)
    return up, down


def build_file(weight_shapes: dict[str, tuple], natives: list[str], layout: str, rank: int, alpha: float | None,
               seed: int):
    """(tensors, {model key: float64 dense delta}) for a LoRA on the given native modules."""
    generator = torch.Generator().manual_seed(seed)
    up_suffix, down_suffix, writes_alpha = FACTOR_KEYS[layout]
    tensors, deltas = {}, {}
    for native in natives:
        key = f"diffusion_model.{native}.weight"
        shape = weight_shapes[key]
        up, down = random_factors(shape, rank, generator)
        name = module_name(native, layout)
        tensors[name + up_suffix] = up
        tensors[name + down_suffix] = down
        scale = 1.0
        if writes_alpha and alpha is not None:
            tensors[name + ".alpha"] = torch.tensor(alpha)
            scale = alpha / rank
        if layout == "qr":
            tensors[name + ".lora.base_r.weight"] = torch.randn(rank, down.shape[1], generator=generator)
        deltas[key] = (up.flatten(1).double() @ down.flatten(1).double()).reshape(shape) * scale
    return tensors, deltas


# Other kinds ComfyUI's loader reads (comfy/lora.py load_lora, comfy/weight_adapter/), spelled by hand from those files:
# kind -> native modules of the tiny SD1.5 UNet it is written for.
OTHER_KIND_MODULES = {
    "dora": ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn2.to_k"],
    "tucker": ["input_blocks.1.0.in_layers.2"],
    "boft": ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "output_blocks.1.1.transformer_blocks.0.attn1.to_v"],
    "glora": ["input_blocks.1.1.transformer_blocks.0.attn1.to_k"],
    "weight diff": ["input_blocks.1.1.proj_in"],
    "set weight": ["input_blocks.1.1.transformer_blocks.0.attn1.to_v"],
    "norm diff": ["input_blocks.1.1.norm", "input_blocks.1.0.in_layers.0"],
}


def other_kind_parts(kind: str, shape: tuple, randn) -> dict[str, torch.Tensor]:
    """One module's tensors of ``kind`` for a weight of ``shape``, keyed by ComfyUI's suffix (after '<module>.')."""
    out, rest = shape[0], math.prod(shape[1:])
    if kind == "dora":
        return {"lora_up.weight": randn(out, 2), "lora_down.weight": randn(2, rest, std=1.0),
                "alpha": torch.tensor(1.0), "dora_scale": 1.0 + randn(out, 1)}
    if kind == "tucker":
        return {"lora_up.weight": randn(out, 2, 1, 1, std=1.0), "lora_down.weight": randn(2, shape[1], 1, 1),
                "lora_mid.weight": randn(2, 2, *shape[2:], std=1.0), "alpha": torch.tensor(2.0)}
    if kind == "boft":
        return {"oft_blocks": randn(2, out // 4, 4, 4), "alpha": torch.tensor(0.0)}
    if kind == "glora":
        return {"a1.weight": randn(rest, 2), "a2.weight": randn(2, rest), "b1.weight": randn(out, 2),
                "b2.weight": randn(2, rest)}
    if kind == "weight diff":
        return {"diff": randn(*shape, std=0.01), "diff_b": randn(out)}
    if kind == "set weight":
        return {"set_weight": randn(*shape)}
    if kind == "norm diff":
        return {"w_norm": randn(out), "b_norm": randn(out)}
    raise ValueError(kind)


def other_kind_file(weight_shapes: dict[str, tuple], kind: str, seed: int) -> dict[str, torch.Tensor]:
    """A ComfyUI-generic file of one of OTHER_KIND_MODULES' kinds."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, std=0.05):
        return torch.randn(*size, generator=generator) * std

    tensors = {}
    for native in OTHER_KIND_MODULES[kind]:
        shape = weight_shapes[f"diffusion_model.{native}.weight"]
        tensors.update({f"diffusion_model.{native}.{part}": t for part, t in other_kind_parts(kind, shape, randn).items()})
    return tensors
