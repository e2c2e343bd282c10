"""Models tests (and benches) build in-process: real ComfyUI architectures, no files, no downloads."""
from __future__ import annotations

import torch

# The real SDXL UNet layout; built on the meta device for key-layout checks (no memory, no weights).
SDXL_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
    "num_heads": -1, "num_head_channels": 64, "context_dim": 2048, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "legacy": False, "adm_in_channels": 2816, "num_classes": "sequential",
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# ComfyUI's ClipVisionModel at a tiny size (2 layers, 64 wide, 32 px), projecting to 768 like ViT-L/14.
TINY_CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": 768, "torch_dtype": "float32",
}


def sdxl_meta_model():
    """A ComfyUI ModelPatcher around an SDXL UNet on the meta device (ComfyUI must be imported)."""
    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET_CONFIG))
    model = config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


# FLUX.1-dev's transformer as ComfyUI's detection reads it from the published weights (19 double, 38 single blocks)
FLUX_DEV_CONFIG = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
                   "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                   "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                   "guidance_embed": True}


def flux_meta_model():
    """A ComfyUI ModelPatcher around FLUX.1-dev's full-depth transformer on the meta device: its real key names and
    shapes (12B parameters, no weights), for what depends on the block count only."""
    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet_config(dict(FLUX_DEV_CONFIG))
    model = config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def tiny_clip_vision(config_dir, seed: int = 5):
    """ComfyUI's ClipVisionModel built from TINY_CLIP_VISION_CONFIG, weights from a seeded generator.

    ComfyUI's CLIPVisionLoader only accepts the published layouts (ViT-L/14 224 or 336, ViT-H, ViT-bigG, SigLIP
    384/512, DINOv2 large/giant); in-process tests construct the same class from a small config instead."""
    import json

    import comfy.clip_vision
    from build_tiny_models import init_weights_

    path = config_dir / "tiny_vision.json"
    path.write_text(json.dumps(TINY_CLIP_VISION_CONFIG))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    init_weights_(model.model, torch.Generator().manual_seed(seed))
    return model
