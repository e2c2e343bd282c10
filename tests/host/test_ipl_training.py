"""Train Prompt Mapper and Zero-shot Adapt with real ComfyUI encoders (tiny sizes)."""
from __future__ import annotations

import pytest
import torch

from core.adapter import LowRank
from core.ipl import LatentMapper, contrastive_loss, load_mapper

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def training(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.ipl")


def images(count=4, seed=0, size=32):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def train(comfy, clip_vision, clip, filename, iterations=10, overwrite=True, **kwargs):
    return comfy["CSA_TrainPromptMapper"].execute(
        clip_vision=clip_vision, clip=clip, source_label="photo", target_label="sketch", iterations=iterations, lr=0.05,
        batch_size=4, n_ctx=4, regularizer_weight=1.0, seed=3, filename=filename, overwrite=overwrite, **kwargs).args


def source_loss(training, clip, clip_vision, mapper, batch):
    with torch.no_grad():
        embeds = clip_vision.encode_image(batch)["image_embeds"].float()
        features = training.prompt_features(clip, "l", mapper, mapper(embeds), "photo")
        return float(contrastive_loss(embeds, features))


def test_stage_one_trains_saves_and_lowers_the_contrastive_loss(comfy, comfy_base, training, tiny_clip_vision,
                                                                clip_with_projection):
    batch = images()
    name, curve = train(comfy, tiny_clip_vision, clip_with_projection, "host_trained_mapper", images=batch)
    assert name == "host_trained_mapper.safetensors" and curve.shape == (1, 256, 512, 3)
    trained, metadata = load_mapper(comfy_base / "models" / "prompt_mappers" / name)
    assert trained.config()["token_dims"] == {"l": 768} and metadata["csa.target_label"] == "sketch"
    torch.manual_seed(3)
    untrained = LatentMapper(768, 4, {"l": 768})
    assert source_loss(training, clip_with_projection, tiny_clip_vision, trained, batch) < \
        0.8 * source_loss(training, clip_with_projection, tiny_clip_vision, untrained, batch)
    with pytest.raises(FileExistsError, match="host_trained_mapper.safetensors already exists"):
        train(comfy, tiny_clip_vision, clip_with_projection, "host_trained_mapper", 1, overwrite=False, images=batch)


def test_stage_one_needs_a_text_projection_and_images(comfy, tiny_sd15, tiny_clip_vision, clip_with_projection):
    with pytest.raises(ValueError, match="this CLIP has no text projection"):
        train(comfy, tiny_clip_vision, tiny_sd15[1], "host_no_projection", 1, images=images())
    with pytest.raises(ValueError, match="give source images, an image_folder, or both"):
        train(comfy, tiny_clip_vision, clip_with_projection, "host_no_images", 1)
    with pytest.raises(ValueError, match="image_folder '../x' is not a folder inside"):
        train(comfy, tiny_clip_vision, clip_with_projection, "host_bad_folder", 1, image_folder="../x")


def test_stage_one_reads_a_folder(comfy, comfy_base, tiny_clip_vision, clip_with_projection):
    from PIL import Image

    folder = comfy_base / "input" / "ipl_sources"
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images(3, seed=5, size=40)):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"{i}.png")
    name, _ = train(comfy, tiny_clip_vision, clip_with_projection, "host_folder_mapper", 2, image_folder="ipl_sources")
    assert (comfy_base / "models" / "prompt_mappers" / name).is_file()


def test_stage_two_trains_a_lora_on_every_attention_projection(comfy, tiny_sd15, tiny_clip_vision,
                                                               clip_with_projection):
    model, _, vae = tiny_sd15
    train(comfy, tiny_clip_vision, clip_with_projection, "host_stage2_mapper", 3, images=images())
    adapter, curve = comfy["CSA_ZeroShotAdapt"].execute(
        model=model, vae=vae, clip=clip_with_projection, clip_vision=tiny_clip_vision,
        mapper_name="host_stage2_mapper.safetensors", images=images(2, seed=7, size=64), source_label="photo",
        target_label="sketch", iterations=3, lr=1e-2, rank=2, seed=0).args
    assert adapter.method == "ipl-zero-shot" and adapter.ranks == [2] and len(adapter.modules) == 32
    assert all(not f.up.requires_grad for f in adapter.modules.values())
    assert any(f.up.abs().sum() > 0 for f in adapter.modules.values()), "training never moved the adapter"
    assert curve.shape == (1, 256, 512, 3)
    assert model.patches == {} and not model.object_patches
    patched = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args[0]
    assert len(patched.patches) == 32


def test_stage_two_frozen_prediction_is_the_base_model_and_adapted_one_is_not(training, tiny_sd15):
    """The directional loss compares the frozen model with the adapted one: the switch must reach the UNet call."""
    import comfy.model_management as mm

    model, _, _ = tiny_sd15
    generator = torch.Generator().manual_seed(1)
    modules = {training.generic_module_name(k): LowRank(up=torch.randn(s[0], 2, generator=generator),
                                                        down=torch.randn(2, s[1], generator=generator))
               for k, s in training.attention_targets(model).items()}
    adapter = training.Adapter(modules=modules, role="style", method="test", source="test")
    x, sigma = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([2.0])
    cond = torch.randn(1, 77, 768, generator=generator)
    try:
        training.cc.load_for_direct_calls(model)
        with torch.no_grad():
            base = training.cc.denoised(model, x, sigma, cond, {})
        patched = model.clone()
        training.install_switched_adapters(patched, {training.ADAPTED: adapter}, frozenset({training.ADAPTED}))
        training.cc.load_for_direct_calls(patched)
        with torch.no_grad():
            frozen = training.cc.denoised(patched, x, sigma, cond, {training.ACTIVE_KEY: frozenset()})
            adapted = training.cc.denoised(patched, x, sigma, cond, {training.ACTIVE_KEY: frozenset({training.ADAPTED})})
    finally:
        mm.unload_all_models()
    assert torch.equal(frozen, base)
    assert (adapted - base).abs().max() > 1e-3


def test_stage_two_refuses_pooled_models(comfy, sdxl_meta, tiny_sd15, tiny_clip_vision, clip_with_projection):
    with pytest.raises(ValueError, match="SD1.x / SD2.x"):
        comfy["CSA_ZeroShotAdapt"].execute(
            model=sdxl_meta, vae=tiny_sd15[2], clip=clip_with_projection, clip_vision=tiny_clip_vision,
            mapper_name="x.safetensors", images=images(1), source_label="photo", target_label="sketch", iterations=1,
            lr=1e-3, rank=2, seed=0)


def test_cancel_stops_training_cleanly_without_writing_a_file(comfy, comfy_base, tiny_clip_vision,
                                                               clip_with_projection):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(comfy, tiny_clip_vision, clip_with_projection, "host_cancelled_mapper", 5, images=images())
    finally:
        mm.interrupt_current_processing(False)
    assert not (comfy_base / "models" / "prompt_mappers" / "host_cancelled_mapper.safetensors").exists()
