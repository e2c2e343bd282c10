"""Build the deterministic models the demo and the tests run on. Nothing is downloaded: every weight comes from
one seeded generator (or, for the world model, from the committed weights). Files, in ``--out``
(names in scripts/model_names.py; base-directory folders in scripts/comfy_host.py):

- ``TINY_CHECKPOINT_NAME`` (tiny_sd15.safetensors): an SD1.5-shaped checkpoint ComfyUI detects as SD15. UNet
  with one level (model_channels 320, context 768, one ResBlock + one transformer per block, 25.8M
  parameters), a TAESD VAE under ``first_stage_model.taesd_*``, a random CLIP-L (ComfyUI's SD1 config).
- ``DEMO_LORA_NAME``: a kohya LoRA (native names, rank 4, alpha 4) on every attention projection (role style).
- ``DEMO_CONTENT_NAME``: a diffusers / PEFT LoRA (unet.down_blocks.0...lora_A/B, rank 8) on the input block's
  attention (role content).
- ``DEMO_BLORA_NAMES``: kohya files with diffusers names on both B-LoRA blocks (up_blocks.0.attentions.0 / .1),
  method b-lora, one per Content-Style Guider slot.
- ``CLIP_L_NAME``: the checkpoint's text encoder as a standalone CLIP-L file with a random text_projection.
- ``CLIP_VISION_NAME``: a ViT-L/14 CLIP vision encoder with random weights (600 MB), the smallest layout
  ComfyUI's CLIPVisionLoader accepts.
- ``DEMO_MAPPER_NAME``: a random IPL latent mapper (ViT-L embeddings -> 4 CLIP-L token vectors).
- ``WORLD_CHECKPOINT_NAME``: the miniature world's base model: committed UNet + VAE (``WORLD_WEIGHTS``) plus
  this script's CLIP-L, whose hash must equal the one the world was trained with.
- ``stamp``: the hash of every build input; set-up rebuilds everything when it changes.

Run with the host venv's python and ComfyUI on ``sys.path`` (scripts/setup_host.sh does both).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the pack's core/ (no ComfyUI imports)
from core.adapter import LowRank, new_lowrank  # noqa: E402
from core.adapter_file import write_safetensors  # noqa: E402
from core.blocks import is_attention_projection  # noqa: E402
from core.formats import tensors_from_modules  # noqa: E402
from model_names import (TINY_CHECKPOINT_NAME, CLIP_L_NAME, CLIP_VISION_NAME, DEMO_BLORA_NAMES,  # noqa: E402
                         DEMO_CONTENT_NAME, DEMO_LORA_NAME, DEMO_MAPPER_NAME, WORLD_CHECKPOINT_NAME, WORLD_WEIGHTS)

SEED = 20261122

TINY_SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "num_heads": 8,
    "num_head_channels": -1,
    "context_dim": 768,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

DEMO_LORA_RANK = 4


REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_INPUTS = (Path(__file__), REPO_ROOT / "scripts" / "model_names.py",
                *(REPO_ROOT / "core" / name for name in ("adapter.py", "adapter_file.py", "blocks.py", "formats.py",
                                                         "ipl.py", "layouts.py")))


@functools.cache  # read once per run: every built file's metadata and the stamp carry it
def script_hash() -> str:
    """Changes when this script, a file it builds with, or the committed world weights change (each means: rebuild)."""
    digest = hashlib.sha256()
    for path in BUILD_INPUTS:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    if WORLD_WEIGHTS.exists():
        digest.update(hashlib.sha256(WORLD_WEIGHTS.read_bytes()).digest())
    return digest.hexdigest()[:16]


def init_weights_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a finite, well-scaled value.

    ComfyUI builds its modules with uninitialised storage (torch.empty), so every tensor is set here.
    Norm layers are picked by type, not by name: the UNet's GroupNorms are called in_layers.0,
    out_layers.0 and out.0, and zeroing them would silently cut every ResBlock.
    """
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if isinstance(sub, norm_types):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif param.ndim >= 2:
                    fan_in = param[0].numel()
                    param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
                else:
                    param.zero_()
            for name, buf in sub.named_buffers(recurse=False):
                if buf.is_floating_point() and not torch.isfinite(buf).all():
                    buf.zero_()


def build_unet(generator: torch.Generator) -> dict[str, torch.Tensor]:
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**TINY_SD15_UNET_CONFIG, dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    init_weights_(unet, generator)
    # Keep the output head small so the tiny model's epsilon stays in a sane range.
    with torch.no_grad():
        unet.out[2].weight.mul_(0.1)
    return {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}


def build_taesd(generator: torch.Generator) -> dict[str, torch.Tensor]:
    from comfy.taesd.taesd import TAESD

    taesd = TAESD(latent_channels=4)
    init_weights_(taesd, generator)
    state = {k: v for k, v in taesd.state_dict().items() if k.startswith(("taesd_encoder.", "taesd_decoder."))}
    # Identity latent scaling, ComfyUI's own defaults for an SD1.5 TAESD.
    state["vae_scale"] = torch.tensor(1.0)
    state["vae_shift"] = torch.tensor(0.0)
    return {f"first_stage_model.{k}": v for k, v in state.items()}


def build_clip_l(generator: torch.Generator) -> dict[str, torch.Tensor]:
    import comfy.ops
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32,
                                      model_options={"custom_operations": comfy.ops.disable_weight_init})
    init_weights_(clip.transformer, generator)
    with torch.no_grad():
        for name, param in clip.transformer.named_parameters():
            if "embedding" in name:
                param.normal_(0.0, 0.02, generator=generator)
    state = clip.transformer.state_dict()
    state.pop("text_model.embeddings.position_ids", None)
    return {f"cond_stage_model.transformer.{k}": v for k, v in state.items()}


def attention_projection_keys(unet_state: dict[str, torch.Tensor]) -> list[str]:
    """Every attention projection weight of the UNet, as checkpoint keys without 'model.'."""
    return sorted(k[len("model."):] for k in unet_state if is_attention_projection(k))


def kohya_file(factors) -> dict[str, torch.Tensor]:
    """A kohya file (lora_unet_<path>.lora_up/lora_down/alpha, alpha = rank) through the pack's own writer."""
    modules = {"lora_unet_" + module.replace(".", "_"): LowRank(up=up, down=down, alpha=float(down.shape[0]))
               for module, down, up in factors}
    return tensors_from_modules(modules, {name: name for name in modules})


def build_demo_lora(unet_state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA (lora_unet_*) on every attention projection of the tiny UNet."""
    return kohya_file(demo_factors_in_blocks(unet_state, generator, None, DEMO_LORA_RANK))


def demo_factors_in_blocks(unet_state: dict[str, torch.Tensor], generator: torch.Generator,
                           blocks: dict[str, str] | None, rank: int):
    """(module renamed by ``blocks``, down, up) for every attention projection inside the given native blocks
    (``None``: every projection, native name): down ~ N(0, 1/in), up ~ N(0, 0.25) (drawn in that order)."""
    for key in attention_projection_keys(unet_state):
        native = key[len("diffusion_model."):-len(".weight")]
        if blocks is None:
            renamed = native
        else:
            block = next((b for b in blocks if native.startswith(b + ".")), None)
            if block is None:
                continue
            renamed = blocks[block] + native[len(block):]
        factors = new_lowrank(tuple(unet_state["model." + key].shape), rank, generator, up_std=0.5)
        yield renamed, factors.down, factors.up


def build_demo_content(unet_state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT-format LoRA (unet.<diffusers path>.lora_A/B) on the tiny UNet's input-block attention."""
    lora: dict[str, torch.Tensor] = {}
    blocks = {"input_blocks.1.1": "unet.down_blocks.0.attentions.0"}
    for module, down, up in demo_factors_in_blocks(unet_state, generator, blocks, 2 * DEMO_LORA_RANK):
        lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"] = down, up
    return lora


def build_demo_b_lora(unet_state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A B-LoRA-style kohya file (diffusers names) on both B-LoRA blocks of the tiny UNet: up_blocks.0.attentions.0
    (content) and .1 (style), which ComfyUI calls output_blocks.0.1 and output_blocks.1.1."""
    blocks = {"output_blocks.0.1": "up_blocks.0.attentions.0", "output_blocks.1.1": "up_blocks.0.attentions.1"}
    return kohya_file(demo_factors_in_blocks(unet_state, generator, blocks, DEMO_LORA_RANK))


def build_clip_l_with_projection(checkpoint: dict[str, torch.Tensor], generator: torch.Generator):
    """The checkpoint's text encoder as a standalone CLIP-L file, plus a random text_projection.

    SD1.5 checkpoints cannot carry text_projection, which IPL needs to put text and image features in one
    CLIP space; ComfyUI's CLIPLoader reads it from a standalone text-encoder file like this one."""
    prefix = "cond_stage_model.transformer."
    state = {k[len(prefix):]: v for k, v in checkpoint.items() if k.startswith(prefix)}
    state["text_projection.weight"] = (torch.randn(768, 768, generator=generator) / math.sqrt(768)).to(torch.float16)
    return state


def build_clip_vision_vit_l(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A ViT-L/14 CLIP vision encoder with random weights: the smallest layout ComfyUI's CLIPVisionLoader accepts."""
    import os as _os

    import comfy.clip_vision

    config = _os.path.join(_os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_vitl.json")
    model = comfy.clip_vision.ClipVisionModel(config).model
    init_weights_(model, generator)
    return {k: v.to(torch.float16) for k, v in model.state_dict().items()}


def build_demo_mapper(generator: torch.Generator, out_path: Path) -> None:
    """A random IPL latent mapper for ViT-L image embeddings (768) and CLIP-L token embeddings (768)."""
    from core.ipl import LatentMapper, save_mapper

    with torch.random.fork_rng(devices=[]):  # the mapper initialises from torch's generator: seed a private copy
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        mapper = LatentMapper(in_dim=768, n_ctx=4, token_dims={"l": 768})
    save_mapper(mapper, out_path, {"csa.build_hash": script_hash()}, overwrite=True)


def clip_hash(clip) -> str:
    """Hash of a ComfyUI CLIP's text-encoder weights in fp16 (text_projection left out: SD1.5 files lack it)."""
    state = {k: v for k, v in clip.cond_stage_model.state_dict().items() if "text_projection" not in k}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].to(torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# The world's text encoder: the tiny CLIP-L with its token embeddings x30 and every residual branch (attention out_proj,
# MLP fc2) x0.3. The random CLIP-L as built mixes its tokens so much that a word's output is closer to another word's at
# the same position than to its own elsewhere (cosine 0.86 against 0.89): no cross-attention can find a word in it. With
# this scaling a word stays itself (0.91 against 0.47) and still carries its context ("circle" after "red" or "striped":
# 0.91), as a trained encoder's words do. World weights trained on it say so in their metadata (WORLD_TEXT_ENCODER_KEY).
WORLD_TEXT_ENCODER = "token embeddings x30, out_proj and fc2 x0.3"
WORLD_TEXT_ENCODER_KEY = "csa.world_text_encoder"


def scale_to_world_text_encoder_(state: dict[str, torch.Tensor]) -> None:
    """In place, on any CLIP-L state dict (checkpoint keys or a loaded model's): the world's text encoder.

    Scaled in float32 and rounded to float16 (the checkpoint's dtype), so every copy of it holds the same values."""
    branches = ("self_attn.out_proj.weight", "self_attn.out_proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    with torch.no_grad():
        for key, value in state.items():
            factor = 30.0 if key.endswith("embeddings.token_embedding.weight") else 0.3 if key.endswith(branches) else None
            if factor is not None:
                value.copy_((value.float() * factor).to(torch.float16).to(value.dtype))


def build_world_checkpoint(checkpoint: dict[str, torch.Tensor], out_path: Path) -> None:
    """The world base model: committed UNet + VAE weights, plus this script's deterministic CLIP-L.

    The CLIP is rebuilt from a fixed seed (scaled to the world's text encoder when the weights were trained on it),
    so its hash must equal the one the UNet was trained with."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import comfy.sd

    world = load_file(str(WORLD_WEIGHTS))
    with safe_open(str(WORLD_WEIGHTS), "pt") as handle:
        expected = handle.metadata().get("csa.world_clip_hash")
        scaled = handle.metadata().get(WORLD_TEXT_ENCODER_KEY) == WORLD_TEXT_ENCODER
    clip = {k: v.clone() for k, v in checkpoint.items() if k.startswith("cond_stage_model.")}
    loaded = comfy.sd.load_checkpoint_guess_config(str(out_path.parent / TINY_CHECKPOINT_NAME), output_model=False,
                                                   output_vae=False)[1]
    if scaled:
        scale_to_world_text_encoder_(clip)
        scale_to_world_text_encoder_(loaded.cond_stage_model.state_dict())
    if expected != clip_hash(loaded):
        raise RuntimeError(f"the rebuilt CLIP-L (hash {clip_hash(loaded)}) is not the one the world model was "
                           f"trained with ({expected}); the world weights need retraining")
    save_atomic({**world, **clip}, out_path, {"csa.build_hash": script_hash(), "modelspec.title": "CSA world SD1.5"})


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Rebuilt files replace the old ones (the stamp said they are stale); written atomically by the pack's writer."""
    write_safetensors(path, tensors, metadata, overwrite=True)


def build(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)
    unet = build_unet(generator)
    checkpoint = {**unet, **build_taesd(generator), **build_clip_l(generator)}
    checkpoint = {k: v.to(torch.float16) for k, v in checkpoint.items()}
    for key, value in checkpoint.items():
        if not torch.isfinite(value).all():
            raise RuntimeError(f"tiny model weight {key} is not finite after fp16 cast")
    meta = {"modelspec.title": "Content-Style Adapters tiny SD1.5", "csa.build_hash": script_hash()}
    save_atomic(checkpoint, out_dir / TINY_CHECKPOINT_NAME, meta)
    lora = build_demo_lora(unet, generator)
    save_atomic(lora, out_dir / DEMO_LORA_NAME, {"csa.build_hash": script_hash(), "csa.role": "style"})
    save_atomic(build_demo_content(unet, generator), out_dir / DEMO_CONTENT_NAME,
                {"csa.build_hash": script_hash(), "csa.role": "content"})
    save_atomic(build_clip_l_with_projection(checkpoint, generator), out_dir / CLIP_L_NAME,
                {"csa.build_hash": script_hash()})
    save_atomic(build_clip_vision_vit_l(generator), out_dir / CLIP_VISION_NAME, {"csa.build_hash": script_hash()})
    build_demo_mapper(generator, out_dir / DEMO_MAPPER_NAME)
    if WORLD_WEIGHTS.exists():
        build_world_checkpoint(checkpoint, out_dir / WORLD_CHECKPOINT_NAME)
    for name in DEMO_BLORA_NAMES:
        save_atomic(build_demo_b_lora(unet, generator), out_dir / name, {"csa.build_hash": script_hash(),
                                                                         "csa.method": "b-lora"})
    (out_dir / "stamp").write_text(json.dumps({"hash": script_hash()}))


def is_current(out_dir: Path) -> bool:
    stamp = out_dir / "stamp"
    expected = [TINY_CHECKPOINT_NAME, DEMO_LORA_NAME, DEMO_CONTENT_NAME, *DEMO_BLORA_NAMES, CLIP_L_NAME,
                CLIP_VISION_NAME, DEMO_MAPPER_NAME] + ([WORLD_CHECKPOINT_NAME] if WORLD_WEIGHTS.exists() else [])
    if not stamp.exists() or not all((out_dir / name).exists() for name in expected):
        return False
    return json.loads(stamp.read_text()).get("hash") == script_hash()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="cache folder for the built models")
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI source tree to import from")
    args = parser.parse_args()
    if is_current(args.out):
        print(f"tiny models up to date in {args.out}")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from comfy_host import import_comfyui

    import_comfyui(args.comfyui)
    build(args.out)
    print(f"built tiny models in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
