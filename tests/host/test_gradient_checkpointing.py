"""Gradient checkpointing (Training Options): each block the diffusion model calls is recomputed in the backward
pass, with the run-time adapters inside it, so a run trains exactly the factors it trains without it, on a UNet and
on FLUX (its blocks re-entrantly, on copies); B4M's routed losses on a DiT are refused by name."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host


def options(comfy, checkpointing: bool):
    return comfy["CSA_TrainingOptions"].execute(
        batch_size=1, accumulation=1, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=0.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision="fp32", gradient_checkpointing=checkpointing).args[0]


def train(comfy, model, data, checkpointing: bool, **extra):
    return comfy["CSA_TrainAdapter"].execute(
        model=model, data=data, targets="attention projections", blocks="", rank=2, alpha=2.0, steps=2, lr=1e-2,
        loss=extra.pop("loss", "epsilon"), role="content", seed=0, filename="", overwrite=True, resume_from="none",
        options=options(comfy, checkpointing), **extra).args[0]


def same_factors(a, b) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(a.modules[k].up, b.modules[k].up) and torch.equal(a.modules[k].down, b.modules[k].down)
        for k in a.modules)


def test_a_checkpointed_unet_run_trains_the_same_factors(comfy, comfy_base, tiny_sd15):
    from comfy_host import pack_module

    model, clip, vae = tiny_sd15
    generator = torch.Generator().manual_seed(0)
    data = comfy["CSA_TrainingImages"].execute(images=torch.rand(2, 64, 64, 3, generator=generator),
                                               captions="a sks square", image_folder="", repeats=1, trigger_word="",
                                               resolution=64).args[0]
    units = pack_module(comfy_base, "nodes.comfy_compat").checkpoint_units(model)
    assert "diffusion_model.input_blocks.1.1" in units and "diffusion_model.middle_block.1" in units
    plain, checkpointed = (train(comfy, model, data, flag, clip=clip, vae=vae) for flag in (False, True))
    assert any(float(f.up.abs().max()) > 0 for f in plain.modules.values())
    assert same_factors(plain, checkpointed)


def flux_latents(comfy, seed: int):
    """Training Latents for the tiny FLUX: one latent and its conditioning, given directly (no small T5)."""
    generator = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(1, 16, 16, 16, generator=generator) * 0.5}
    conditioning = [[torch.randn(1, 8, 4096, generator=generator),
                     {"pooled_output": torch.randn(1, 768, generator=generator), "guidance": 3.5}]]
    return comfy["CSA_TrainingLatents"].execute(latents=latents, conditioning=conditioning, captions="a sks photo",
                                                repeats=1, trigger_word="").args[0]


def test_a_checkpointed_flux_run_trains_the_same_factors(comfy, comfy_base, tiny_flux):
    from comfy_host import pack_module

    data = flux_latents(comfy, seed=1)
    units = pack_module(comfy_base, "nodes.comfy_compat").checkpoint_units(tiny_flux)
    assert {"diffusion_model.double_blocks.0", "diffusion_model.single_blocks.0"} <= set(units)
    plain, checkpointed = (train(comfy, tiny_flux, data, flag, loss="v") for flag in (False, True))
    assert any(float(f.up.abs().max()) > 0 for f in plain.modules.values())
    assert same_factors(plain, checkpointed)


def test_checkpointing_b4m_with_its_routed_losses_on_a_dit_is_refused_by_name(comfy, tiny_flux):
    data = flux_latents(comfy, seed=2)
    with pytest.raises(ValueError, match="gradient checkpointing on Flux .* cannot route B4M's two losses"):
        comfy["CSA_TrainB4MContent"].execute(
            model=tiny_flux, data=data, auxiliary_data=data, targets="attention projections", blocks="", rank=4,
            steps=1, lr=1e-3, lr_auxiliary=1e-4, orthogonal_init=True, loss="epsilon", seed=0, filename="",
            overwrite=False, resume_from="none", options=options(comfy, True))
