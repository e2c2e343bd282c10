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


def test_world_training_captions_name_two_objects_in_reading_order_in_the_share_asked():
    """train_world.training_captions: by default either order at random; with a reading-order share of 1 (0) every
    two-object caption names the objects left to right / top to bottom (the other way round), in every form."""
    import sys

    import numpy as np

    sys.path.insert(0, str(comfy_host.REPO_ROOT / "bench" / "world"))
    from train_world import training_captions
    from world import TWO_OBJECT_FORMS, dataset, phrase_two, reading_order, two_object_scenes

    singles, scenes = dataset(per_pair=1, seed=1)[:3], two_object_scenes(24, seed=1, wide=True)

    def named_in_reading_order(share):
        rows = training_captions(singles, scenes, np.random.default_rng(8), share)[len(singles):]
        verdicts = []
        for scene, row in zip(scenes, rows):
            first, second = (scene.objects[i] for i in reading_order(scene))
            forward = {phrase_two(first, second, form) for form in TWO_OBJECT_FORMS}
            backward = {phrase_two(second, first, form) for form in TWO_OBJECT_FORMS}
            assert all(caption in forward | backward for caption in row), row
            verdicts += [caption in forward for caption in row]
        return verdicts

    assert all(named_in_reading_order(1.0)) and not any(named_in_reading_order(0.0))
    at_random = named_in_reading_order(None)
    assert 0.3 < np.mean(at_random) < 0.7, np.mean(at_random)
