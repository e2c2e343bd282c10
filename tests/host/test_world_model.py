"""The miniature world's base model loads with ComfyUI's stock checkpoint loader as an SD1.5 model."""
from __future__ import annotations

import pytest
import torch

import comfy_host
from model_names import WORLD_CHECKPOINT_NAME

pytestmark = pytest.mark.host


def test_world_checkpoint_loads_as_an_sd15_model_with_the_stock_loader(comfy):
    import comfy.latent_formats
    import comfy.sd

    path = comfy_host.TINY_MODELS_DIR / WORLD_CHECKPOINT_NAME
    assert path.exists(), f"set-up did not assemble {path} from bench/world/weights"
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    assert type(model.model.model_config).__name__ == "SD15"
    assert isinstance(model.model.latent_format, comfy.latent_formats.SD15)
    with torch.no_grad():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
        assert latent.shape == (1, 4, 8, 8)
        assert vae.decode(latent).shape == (1, 64, 64, 3)
    assert clip.encode_from_tokens(clip.tokenize("a striped ring")).shape == (1, 77, 768)
