"""FLUX LoRA files as people have them, for the tiny FLUX model (scripts/tiny_dit_models.py: one double block, one
single block, hidden 3072), spelled from hand-written tables (not from the pack's code or ComfyUI's key map).

- diffusers / PEFT (``transformer.<diffusers path>.lora_A / lora_B``, what most FLUX LoRAs on the hubs use; ai-toolkit,
  SimpleTuner, diffusers' own trainer): to_q / to_k / to_v and the add_*_proj land on slices of the fused qkv weights,
  the single blocks' to_q / to_k / to_v / proj_mlp on slices of linear1, norm_out.linear on the final modulation with
  its two halves swapped.
- kohya / BFL names (``lora_unet_double_blocks_0_img_attn_qkv.lora_up / lora_down / alpha``): whole fused weights.
"""
from __future__ import annotations

import torch

H, MLP = 3072, 12288
DOUBLE, SINGLE = "transformer.transformer_blocks.0", "transformer.single_transformer_blocks.0"
# module -> (out, in) of its change
DIFFUSERS_FLUX_MODULES: dict[str, tuple[int, int]] = {
    **{f"{DOUBLE}.attn.{p}": (H, H) for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                              "add_v_proj", "to_add_out")},
    f"{DOUBLE}.ff.net.0.proj": (MLP, H), f"{DOUBLE}.ff.net.2": (H, MLP),
    f"{DOUBLE}.ff_context.net.0.proj": (MLP, H), f"{DOUBLE}.ff_context.net.2": (H, MLP),
    f"{DOUBLE}.norm1.linear": (6 * H, H), f"{DOUBLE}.norm1_context.linear": (6 * H, H),
    **{f"{SINGLE}.attn.{p}": (H, H) for p in ("to_q", "to_k", "to_v")},
    f"{SINGLE}.proj_mlp": (MLP, H), f"{SINGLE}.proj_out": (H, H + MLP), f"{SINGLE}.norm.linear": (3 * H, H),
    "transformer.norm_out.linear": (2 * H, H),
}
# the fused weights the diffusers slices land on: weight key -> [(module, first row, rows)]
FUSED_SLICES: dict[str, list[tuple[str, int, int]]] = {
    "diffusion_model.double_blocks.0.img_attn.qkv.weight": [(f"{DOUBLE}.attn.to_{p}", i * H, H)
                                                            for i, p in enumerate("qkv")],
    "diffusion_model.double_blocks.0.txt_attn.qkv.weight": [(f"{DOUBLE}.attn.add_{p}_proj", i * H, H)
                                                            for i, p in enumerate("qkv")],
    "diffusion_model.single_blocks.0.linear1.weight": [*((f"{SINGLE}.attn.to_{p}", i * H, H) for i, p in enumerate("qkv")),
                                                       (f"{SINGLE}.proj_mlp", 3 * H, MLP)],
}
KOHYA_FLUX_MODULES: dict[str, tuple[int, int]] = {
    **{f"lora_unet_double_blocks_0_{s}_{p}": shape for s in ("img", "txt") for p, shape in (
        ("attn_qkv", (3 * H, H)), ("attn_proj", (H, H)), ("mlp_0", (MLP, H)), ("mlp_2", (H, MLP)),
        ("mod_lin", (6 * H, H)))},
    "lora_unet_single_blocks_0_linear1": (3 * H + MLP, H), "lora_unet_single_blocks_0_linear2": (H, H + MLP),
    "lora_unet_single_blocks_0_modulation_lin": (3 * H, H),
}
SUFFIXES = {"diffusers": (".lora_B.weight", ".lora_A.weight", False), "kohya": (".lora_up.weight", ".lora_down.weight", True)}


def flux_lora(layout: str, rank: int = 4, seed: int = 0, alpha: float = 2.0, dtype=torch.bfloat16,
              modules: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors in ``layout`` ('diffusers' or 'kohya'; kohya writes alpha, diffusers does not)."""
    modules = modules or (DIFFUSERS_FLUX_MODULES if layout == "diffusers" else KOHYA_FLUX_MODULES)
    up_suffix, down_suffix, writes_alpha = SUFFIXES[layout]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inner) in modules.items():
        tensors[name + down_suffix] = (torch.randn(rank, inner, generator=generator) / inner ** 0.5).to(dtype)
        tensors[name + up_suffix] = (torch.randn(out, rank, generator=generator) * 0.02).to(dtype)
        if writes_alpha:
            tensors[name + ".alpha"] = torch.tensor(alpha)
    return tensors
