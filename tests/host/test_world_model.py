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


def test_world_training_caption_encodings_are_cached_per_encoder_and_caption_list(tiny_sd15, tmp_path):
    """train_world.caption_conds: a second call with the same encoder and captions reads the cache (equal to encoding
    afresh); other captions or another encoder are encoded afresh and replace it."""
    import copy
    import sys

    sys.path.insert(0, str(comfy_host.REPO_ROOT / "bench" / "world"))
    from train_world import caption_conds

    _, clip, _ = tiny_sd15
    cache = tmp_path / "conds.safetensors"
    captions = ["a red circle", "striped square", ""]
    fresh = caption_conds(clip, captions, None)
    assert not cache.exists()
    first = caption_conds(clip, captions, cache)
    assert cache.exists() and torch.equal(first, fresh)
    marked = {"conds": torch.full_like(fresh, 7.0)}  # a cache that was read, not re-encoded, gives these back
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(cache), "pt") as handle:
        key = handle.metadata()["csa.key"]
    save_file(marked, str(cache), metadata={"csa.key": key})
    assert torch.equal(caption_conds(clip, captions, cache), marked["conds"])
    other = caption_conds(clip, captions[:2], cache)
    assert torch.equal(other, fresh[:2]), "another caption list is encoded afresh"
    with safe_open(str(cache), "pt") as handle:
        key = handle.metadata()["csa.key"]
    save_file({"conds": torch.full_like(other, 7.0)}, str(cache), metadata={"csa.key": key})
    assert torch.equal(caption_conds(clip, captions[:2], cache), torch.full_like(other, 7.0)), "and now cached"
    changed = clip.clone()
    changed.cond_stage_model = copy.deepcopy(clip.cond_stage_model)
    with torch.no_grad():
        changed.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.bias.add_(1.0)
    assert not torch.equal(caption_conds(changed, captions[:2], cache), torch.full_like(other, 7.0)), \
        "another encoder (its hash) is encoded afresh"
