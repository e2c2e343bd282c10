"""Tiny DiT diffusion models that ComfyUI's own loader (UNETLoader: comfy.sd.load_diffusion_model) detects by their
keys: a FLUX.1-dev transformer with one double and one single block, and an SD3 MMDiT of depth 2.

FLUX: ComfyUI fixes 24 heads and rotary axes [16, 56, 56] (head dim 128), so the hidden size must be 3072; block
counts are counted from the keys. One double + one single block (with guidance_in, as FLUX.1-dev) is 545,548,096
parameters, 1.09 GB in bf16, written in about 8 s; ComfyUI loads it in fp32 on the CPU (about 3 GB). SD3: ComfyUI
reads depth = x_embedder's width / 64 and builds depth joint blocks of width 64 · depth (the last context block
"pre-only"); depth 2 is 2.0M parameters.

Files are streamed to disk tensor by tensor (no module is built): matrices N(0, 1/fan_in), norm scales 1, biases 0,
from one seeded generator, so the same seed gives the same bytes. Key names and shapes are those of ComfyUI's
comfy.ldm.flux.model.Flux and comfy.ldm.modules.diffusionmodules.mmdit.MMDiT (a test checks them against ComfyUI's
own modules built on the meta device).
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def flux_tensor_specs(hidden=3072, depth=1, depth_single=1, in_channels=16, patch=2, out_channels=16,
                      context_in=4096, vec_in=768, mlp_ratio=4.0, head_dim=128, guidance=True):
    """[(key, shape, kind)] with kind in {"w", "b", "scale"}, in the order ComfyUI's Flux state_dict has them."""
    h = hidden
    mlp = int(h * mlp_ratio)
    specs = []

    def lin(prefix, fan_in, fan_out):
        specs.append((f"{prefix}.weight", (fan_out, fan_in), "w"))
        specs.append((f"{prefix}.bias", (fan_out,), "b"))

    def mlp_embedder(prefix, in_dim):
        lin(f"{prefix}.in_layer", in_dim, h)
        lin(f"{prefix}.out_layer", h, h)

    lin("img_in", in_channels * patch * patch, h)
    mlp_embedder("time_in", 256)
    mlp_embedder("vector_in", vec_in)
    if guidance:
        mlp_embedder("guidance_in", 256)
    lin("txt_in", context_in, h)
    for i in range(depth):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            lin(f"{p}.{s}_mod.lin", h, 6 * h)
            lin(f"{p}.{s}_attn.qkv", h, 3 * h)
            specs.append((f"{p}.{s}_attn.norm.query_norm.scale", (head_dim,), "scale"))
            specs.append((f"{p}.{s}_attn.norm.key_norm.scale", (head_dim,), "scale"))
            lin(f"{p}.{s}_attn.proj", h, h)
            lin(f"{p}.{s}_mlp.0", h, mlp)
            lin(f"{p}.{s}_mlp.2", mlp, h)
    for i in range(depth_single):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", h, 3 * h + mlp)
        lin(f"{p}.linear2", h + mlp, h)
        specs.append((f"{p}.norm.query_norm.scale", (head_dim,), "scale"))
        specs.append((f"{p}.norm.key_norm.scale", (head_dim,), "scale"))
        lin(f"{p}.modulation.lin", h, 3 * h)
    lin("final_layer.linear", h, patch * patch * out_channels)
    lin("final_layer.adaLN_modulation.1", h, 2 * h)
    return specs


def _chunks(shape, kind, gen, dtype, max_elems=1 << 24):
    """Yield the tensor's values as contiguous row chunks (deterministic for a given seed).

    kind: "w" -> N(0, 1/fan_in) with fan_in = prod(shape[1:]); "b" -> zeros; "scale" -> ones;
    ("std", s) -> N(0, s^2).
    """
    numel = math.prod(shape)
    if kind == "b":
        yield torch.zeros(numel, dtype=dtype)
        return
    if kind == "scale":
        yield torch.ones(numel, dtype=dtype)
        return
    rows, fan_in = shape[0], math.prod(shape[1:])
    std = kind[1] if isinstance(kind, tuple) else 1.0 / math.sqrt(fan_in)
    step = max(1, max_elems // fan_in)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        yield (torch.randn((n, fan_in), generator=gen, dtype=torch.float32) * std).to(dtype)


def write_streamed_safetensors(path, specs, seed=0, dtype=torch.bfloat16, metadata=None):
    """Write [(key, shape, kind)] to a safetensors file chunk by chunk. Returns (num_params, num_bytes)."""
    esize = torch.empty((), dtype=dtype).element_size()
    header, offset, nparams = {}, 0, 0
    for key, shape, _ in specs:
        n = math.prod(shape)
        header[key] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n * esize]}
        offset += n * esize
        nparams += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, shape, kind in specs:
            for chunk in _chunks(shape, kind, gen, dtype):
                f.write(chunk.contiguous().view(torch.uint8).numpy().data)
    return nparams, 8 + len(hb) + offset


def build_tiny_flux(path, seed=0, dtype=torch.bfloat16, guidance=True, depth=1, depth_single=1):
    """Stream a tiny FLUX.1 transformer to `path` (safetensors). Returns (num_params, num_bytes)."""
    specs = flux_tensor_specs(depth=depth, depth_single=depth_single, guidance=guidance)
    meta = {"format": "pt", "tiny_flux": f"seed={seed} depth={depth} depth_single={depth_single} guidance={guidance}"}
    return write_streamed_safetensors(path, specs, seed=seed, dtype=dtype, metadata=meta)



def sd3_tensor_specs(depth=2, in_channels=16, patch=2, out_channels=16, context_in=4096, adm_in=2048,
                     pos_embed_max_size=32, mlp_ratio=4.0, qk_norm=False):
    h = 64 * depth
    mlp = int(h * mlp_ratio)
    specs = []

    def lin(prefix, fan_in, fan_out):
        specs.append((f"{prefix}.weight", (fan_out, fan_in), "w"))
        specs.append((f"{prefix}.bias", (fan_out,), "b"))

    specs.append(("pos_embed", (1, pos_embed_max_size * pos_embed_max_size, h), ("std", 0.02)))
    specs.append(("x_embedder.proj.weight", (h, in_channels, patch, patch), "w"))
    specs.append(("x_embedder.proj.bias", (h,), "b"))
    lin("t_embedder.mlp.0", 256, h)
    lin("t_embedder.mlp.2", h, h)
    lin("y_embedder.mlp.0", adm_in, h)
    lin("y_embedder.mlp.2", h, h)
    lin("context_embedder", context_in, h)
    for i in range(depth):
        for blk in ("context_block", "x_block"):
            p = f"joint_blocks.{i}.{blk}"
            pre_only = blk == "context_block" and i == depth - 1
            lin(f"{p}.attn.qkv", h, 3 * h)
            if qk_norm:
                specs.append((f"{p}.attn.ln_q.weight", (64,), "scale"))
                specs.append((f"{p}.attn.ln_k.weight", (64,), "scale"))
            if not pre_only:
                lin(f"{p}.attn.proj", h, h)
                lin(f"{p}.mlp.fc1", h, mlp)
                lin(f"{p}.mlp.fc2", mlp, h)
            lin(f"{p}.adaLN_modulation.1", h, (2 if pre_only else 6) * h)
    lin("final_layer.linear", h, patch * patch * out_channels)
    lin("final_layer.adaLN_modulation.1", h, 2 * h)
    return specs


def build_tiny_sd3(path, seed=0, dtype=torch.bfloat16, depth=2, pos_embed_max_size=32, qk_norm=False):
    """Stream a tiny SD3 MMDiT to `path`. pos_embed_max_size=32 allows latents up to 64x64 (512 px)."""
    specs = sd3_tensor_specs(depth=depth, pos_embed_max_size=pos_embed_max_size, qk_norm=qk_norm)
    meta = {"format": "pt", "tiny_sd3": f"seed={seed} depth={depth} pos_embed_max_size={pos_embed_max_size} qk_norm={qk_norm}"}
    return write_streamed_safetensors(path, specs, seed=seed, dtype=dtype, metadata=meta)


def builders_hash() -> str:
    """Of this file: a cached model is rebuilt when the builders change."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def cached(folder: Path, name: str, build) -> Path:
    """``folder/<name>-<builders hash>.safetensors``, built by ``build(path)`` (atomically) when missing."""
    path = Path(folder) / f"{name}-{builders_hash()}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        build(partial)
        partial.rename(path)
    return path


def tiny_flux_path() -> Path:
    """The tiny FLUX.1-dev file in the tiny-model cache, built on first use (the tests' and the benches' one)."""
    from comfy_host import TINY_MODELS_DIR

    return cached(TINY_MODELS_DIR, "tiny_flux_dev", build_tiny_flux)
