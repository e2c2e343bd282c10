"""UNet block names: which block a module lives in, B-LoRA block splits and per-block strengths.

Blocks are named as ComfyUI names them (input_blocks.N, middle_block, output_blocks.N); module names in any
spelling the pack reads (kohya, ComfyUI generic, diffusers) are compared on their underscored path.

    module                                                    block (of a model key)
    diffusion_model.input_blocks.4.1.transformer_blocks.0...  input_blocks.4
    diffusion_model.middle_block.1.proj_in                    middle_block
    diffusion_model.time_embed.0                              time_embed
    text_encoders.clip_l.transformer...                       text_encoder
"""
from __future__ import annotations

import json
import re

from .adapter import Adapter
from . import metadata as META

# B-LoRA / ConsisLoRA on SDXL: (diffusers name, ComfyUI name) of the content and the style block.
B_LORA_BLOCKS = {
    "content": ("up_blocks.0.attentions.0", "output_blocks.0.1"),
    "style": ("up_blocks.0.attentions.1", "output_blocks.1.1"),
}
_PATH_PREFIXES = ("lora_unet_", "diffusion_model.", "unet.", "lycoris_")
# first components of UNet module paths: diffusers' names, and ComfyUI's without the diffusion_model. prefix
DIFFUSERS_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
                        "time_embedding.", "add_embedding.")
COMFY_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.", "label_emb.")


def underscored_path(module: str) -> str:
    """A module name without its format prefix, dots replaced by underscores."""
    changed = True
    while changed:
        changed = False
        for prefix in _PATH_PREFIXES:
            if module.startswith(prefix):
                module, changed = module[len(prefix):], True
    return module.replace(".", "_")


def in_block(module: str, block: str) -> bool:
    path, prefix = underscored_path(module), block.replace(".", "_")
    return path == prefix or path.startswith(prefix + "_")


BLOCK_SPLIT_KEY = META.BLOCK_SPLIT  # metadata of a trained ConsisLoRA / B-LoRA file: {"content": [...], "style": [...]}


def b_lora_blocks(adapter: Adapter, part: str) -> tuple[str, ...]:
    """The blocks of an adapter's content or style part: the split its file records (Train ConsisLoRA writes it),
    else B-LoRA's SDXL blocks."""
    if part not in B_LORA_BLOCKS:
        raise ValueError(f"B-LoRA part must be one of {sorted(B_LORA_BLOCKS)}, got {part!r}")
    recorded = adapter.metadata.get(BLOCK_SPLIT_KEY)
    return tuple(json.loads(recorded)[part]) if recorded else B_LORA_BLOCKS[part]


def select_b_lora_part(adapter: Adapter, part: str) -> Adapter:
    """Only the modules of the B-LoRA content block or style block (either spelling)."""
    blocks = b_lora_blocks(adapter, part)
    kept = [name for name in adapter.module_names if any(in_block(name, b) for b in blocks)]
    if not kept:
        raise ValueError(f"{adapter.source}: no module in the B-LoRA {part} block ({' / '.join(blocks)}); "
                         f"the file touches {sorted(touched_blocks(adapter.module_names))[:8]}")
    return adapter.subset(kept)


ATTENTION_PROJECTIONS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


# DiT attention projections: FLUX's double blocks (img_attn / txt_attn qkv and proj) and single blocks (linear1 holds
# q, k, v with the MLP's input, linear2 the attention output with the MLP's), SD3's joint blocks (attn.qkv, attn.proj).
_DIT_ATTENTION = re.compile(r"diffusion_model\.(double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\."
                            r"linear[12]|joint_blocks\.\d+\.(x|context)_block\.attn\.(qkv|proj))\.weight")


def is_attention_projection(model_key: str) -> bool:
    """An attention projection weight: a UNet's to_q / to_k / to_v / to_out.0 of attn1 or attn2, or a DiT's fused
    ones (_DIT_ATTENTION)."""
    return (".attn" in model_key and model_key.endswith(ATTENTION_PROJECTIONS)) or bool(_DIT_ATTENTION.fullmatch(model_key))


_TRANSFORMER_PROJ_OUT = re.compile(
    r"(diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d*)\.\d+)\.proj_out\.weight")
_BLOCK_SHORT_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def transformer_of_proj_out(model_key: str) -> tuple[str, tuple[str, int]] | None:
    """'diffusion_model.input_blocks.1.1.proj_out.weight' -> ('diffusion_model.input_blocks.1.1', ('input', 1)):
    the transformer's module path and ComfyUI's attention-patch block id; None for any other weight."""
    match = _TRANSFORMER_PROJ_OUT.fullmatch(model_key)
    if match is None:
        return None
    return match.group(1), (_BLOCK_SHORT_NAMES[match.group(2)], int(match.group(3) or 0))


_DOUBLE_BLOCK_IMAGE_ATTENTION_OUT = re.compile(r"(diffusion_model\.double_blocks\.(\d+))\.img_attn\.proj\.weight")
CROSS_ATTENTION, JOINT_ATTENTION = "cross attention", "joint attention"


def residual_site(model_key: str) -> tuple[str, tuple, str] | None:
    """Where a Personalized Residual sits, and the attention that localises it: (module path, block id, kind).

    - A UNet transformer's proj_out (the paper's layer): its attn2 block id, cross attention.
    - A FLUX double block's image-stream attention output img_attn.proj, ('double', i), joint attention: its image
      tokens are the pictures' pixels (the single blocks mix text and image tokens in one stream).
    None for any other weight."""
    unet = transformer_of_proj_out(model_key)
    if unet is not None:
        return (*unet, CROSS_ATTENTION)
    match = _DOUBLE_BLOCK_IMAGE_ATTENTION_OUT.fullmatch(model_key)
    if match is None:
        return None
    return match.group(1), ("double", int(match.group(2))), JOINT_ATTENTION


_BLOCK = re.compile(r"^diffusion_model\.((?:input_blocks|output_blocks)\.\d+|middle_block|[a-z_]+)")


def block_of(model_key: str) -> str:
    """The ComfyUI block a model weight key belongs to."""
    if model_key.startswith(("clip_", "text_encoders.")) or ".transformer.text_model." in model_key:
        return "text_encoder"
    match = _BLOCK.match(model_key)
    return match.group(1) if match else model_key.split(".")[0]


def block_of_module(module: str) -> str:
    """The block a module name (any spelling) points into; text-encoder modules give 'text_encoder'."""
    return next(iter(touched_blocks([module])))


def touched_blocks(module_names) -> set[str]:
    """Blocks named by module names in any spelling (diffusers blocks keep their diffusers name)."""
    blocks = set()
    for name in module_names:
        if name.startswith(("lora_te", "text_encoder", "text_encoders.")):
            blocks.add("text_encoder")
            continue
        path = underscored_path(name)
        match = re.match(r"^((?:input|output|down|up)_blocks_\d+|middle_block|mid_block|text_model|[a-z]+)", path)
        blocks.add(match.group(1).replace("_blocks_", "_blocks.") if match else path)
    return blocks


def parse_block_strengths(text: str) -> dict[str, float]:
    """'input_blocks.4=0.5, output_blocks: 0' -> {'input_blocks.4': 0.5, 'output_blocks': 0.0}.

    Entries are separated by commas or new lines; name and value by '=' or ':'.
    """
    strengths: dict[str, float] = {}
    for entry in re.split(r"[,\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        match = re.fullmatch(r"([A-Za-z_][\w.]*)\s*[=:]\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", entry)
        if not match:
            raise ValueError(f"block strengths: cannot read {entry!r}; write entries like 'input_blocks.4=0.5' "
                             f"or 'output_blocks: 0'")
        strengths[match.group(1)] = float(match.group(2))
    return strengths


def strength_of_block(block: str, block_strengths: dict[str, float]) -> float:
    """The most specific entry that names this block or a prefix of it ('output_blocks' covers them all)."""
    best, best_len = 1.0, -1
    for name, value in block_strengths.items():
        if (block == name or block.startswith(name + ".") or block.startswith(name + "_")) and len(name) > best_len:
            best, best_len = value, len(name)
    return best


def check_block_names(block_strengths: dict[str, float], model_blocks: set[str]) -> None:
    unknown = [name for name in block_strengths
               if not any(b == name or b.startswith(name + ".") for b in model_blocks)]
    if unknown:
        raise ValueError(f"block strengths name {unknown}, which this model does not have; "
                         f"its blocks are {sorted(model_blocks)}")
