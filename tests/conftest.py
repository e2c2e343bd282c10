"""Test levels: tests/unit (core/ alone), tests/host (ComfyUI in-process), tests/e2e (a real server).

The host and end-to-end levels need the runtime built by scripts/setup_host.sh (``make test`` runs it).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
for path in (REPO_ROOT, REPO_ROOT / "scripts", REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.append(str(path))

import comfy_host  # noqa: E402  (scripts/comfy_host.py)
import model_names as names  # noqa: E402  (scripts/model_names.py)


def require_host() -> None:
    missing = [p for p in (comfy_host.COMFYUI_DIR / "main.py", comfy_host.TINY_MODELS_DIR / "stamp") if not p.exists()]
    if missing:
        pytest.exit(f"host runtime missing ({', '.join(map(str, missing))}); run `make test` or scripts/setup_host.sh",
                    returncode=2)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory for this test session: the pack in custom_nodes, tiny models in models/."""
    require_host()
    return comfy_host.make_base_directory(tmp_path_factory.mktemp("comfy-base"))


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """ComfyUI imported in this process (CPU) with the pack loaded through ComfyUI's own loader.

    Returns ComfyUI's NODE_CLASS_MAPPINGS, so tests call node classes exactly as the server would.
    """
    comfy_host.import_comfyui(base_directory=comfy_base)
    return comfy_host.load_pack_in_process(comfy_base)


@pytest.fixture(scope="session")
def tiny_sd15(comfy):
    """(model, clip, vae) of the tiny SD1.5 checkpoint, loaded by ComfyUI's checkpoint loader."""
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_host.TINY_MODELS_DIR / names.TINY_CHECKPOINT_NAME))
    return model, clip, vae


@pytest.fixture(scope="session")
def sdxl_meta(comfy):
    """An SDXL-layout ModelPatcher on the meta device: real key names and shapes, no weights."""
    from build_tiny_models import sdxl_meta_model

    return sdxl_meta_model()


@pytest.fixture(scope="session")
def clip_with_projection(comfy):
    """The tiny checkpoint's text encoder loaded by ComfyUI's CLIPLoader path, with a text_projection."""
    import comfy.sd

    return comfy.sd.load_clip(ckpt_paths=[str(comfy_host.TINY_MODELS_DIR / names.CLIP_L_NAME)],
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


@pytest.fixture(scope="session")
def tiny_clip_vision(comfy, tmp_path_factory):
    """ComfyUI's ClipVisionModel class at a tiny size (2 layers, 64 wide, 32 px), projecting to 768 like ViT-L.

    ComfyUI's CLIPVisionLoader only accepts the published layouts (ViT-L/14 224 or 336, ViT-H, ViT-bigG, SigLIP
    384/512, DINOv2 large/giant); in-process tests construct the same class from a small config instead.
    """
    import json

    import torch

    import comfy.clip_vision
    from build_tiny_models import init_weights_

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64,
              "image_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128,
              "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
              "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 768, "torch_dtype": "float32"}
    path = tmp_path_factory.mktemp("clip-vision") / "tiny_vision.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    init_weights_(model.model, torch.Generator().manual_seed(5))
    return model


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    """A real ComfyUI server on a free loopback port, stopped at the end of the session."""
    server = comfy_host.ComfyServer(comfy_base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
