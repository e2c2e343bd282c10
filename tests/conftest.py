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

    import torch

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(comfy_host.TINY_MODELS_DIR / names.TINY_CHECKPOINT_NAME))
    # SD1.5 checkpoints carry no text_projection and ComfyUI leaves that weight uninitialised: usually zeros, but
    # leftovers of freed tensors when a process has run for a while. Zeros, as on a fresh load, keep the checks of
    # "this CLIP has no text projection" deterministic.
    with torch.no_grad():
        clip.cond_stage_model.clip_l.transformer.text_projection.weight.zero_()
    return model, clip, vae


@pytest.fixture(scope="session")
def tiny_flux(comfy):
    """A FLUX.1-dev diffusion model (one double + one single block, hidden 3072) built by the test set-up and loaded by
    UNETLoader's own loader (comfy.sd.load_diffusion_model), which detects it as Flux from its keys."""
    import comfy.sd

    from tiny_dit_models import tiny_flux_path

    return comfy.sd.load_diffusion_model(str(tiny_flux_path()))


@pytest.fixture(scope="session")
def tiny_sd3(comfy):
    """An SD3 MMDiT of depth 2 (2M parameters), built by the test set-up and loaded as UNETLoader loads it."""
    import comfy.sd

    from tiny_dit_models import build_tiny_sd3, cached

    return comfy.sd.load_diffusion_model(str(cached(comfy_host.TINY_MODELS_DIR, "tiny_sd3", build_tiny_sd3)))


@pytest.fixture(scope="session")
def sdxl_meta(comfy):
    """An SDXL-layout ModelPatcher on the meta device: real key names and shapes, no weights."""
    from support.models import sdxl_meta_model

    return sdxl_meta_model()


@pytest.fixture(scope="session")
def flux_meta(comfy):
    """FLUX.1-dev at full depth on the meta device: real key names and shapes, no weights."""
    from support.models import flux_meta_model

    return flux_meta_model()


@pytest.fixture(scope="session")
def clip_with_projection(comfy):
    """The tiny checkpoint's text encoder loaded by ComfyUI's CLIPLoader path, with a text_projection."""
    import comfy.sd

    return comfy.sd.load_clip(ckpt_paths=[str(comfy_host.TINY_MODELS_DIR / names.CLIP_L_NAME)],
                              clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)


@pytest.fixture(scope="session")
def tiny_clip_vision(comfy, tmp_path_factory):
    """ComfyUI's ClipVisionModel class at a tiny size (support.models.TINY_CLIP_VISION_CONFIG)."""
    from support.models import tiny_clip_vision

    return tiny_clip_vision(tmp_path_factory.mktemp("clip-vision"))


@pytest.fixture(scope="session")
def comfy_server(comfy_base):
    """A real ComfyUI server on a free loopback port, stopped at the end of the session."""
    server = comfy_host.ComfyServer(comfy_base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
