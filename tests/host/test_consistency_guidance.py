"""Content-Style Guider against stock ComfyUI guiders on weight-patched models (tiny SD1.5, real sampling)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from support.lora_files import build_file

pytestmark = pytest.mark.host

CONTENT_BLOCK, STYLE_BLOCK = "output_blocks.0.1", "output_blocks.1.1"  # B-LoRA blocks of the tiny UNet
PROJ = [f"transformer_blocks.0.{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
PROMPTS = {"content_positive": "a {c}", "content_negative": "a {v}",
           "style_positive": "in the style of {v}", "style_negative": "in the style of {c}"}


@pytest.fixture(scope="module")
def adapters(comfy, comfy_base, tiny_sd15):
    shapes = {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}
    out = {}
    for seed, (slot, block) in enumerate((("content_of_content", CONTENT_BLOCK), ("style_of_content", STYLE_BLOCK),
                                          ("content_of_style", CONTENT_BLOCK), ("style_of_style", STYLE_BLOCK))):
        tensors, _ = build_file(shapes, [f"{block}.{p}" for p in PROJ], "kohya", rank=4, alpha=4.0, seed=200 + seed)
        save_file(tensors, str(comfy_base / "models" / "loras" / f"consis_{slot}.safetensors"))
        out[slot] = comfy["CSA_LoadAdapter"].execute(adapter_name=f"consis_{slot}.safetensors", strength=1.0,
                                                     part="whole file", role="from file").args[0]
    return out


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def guider(comfy, tiny_sd15, adapters, lam_c=0.0, lam_s=0.0, cfg=4.0, slots=None):
    model, clip, _ = tiny_sd15
    chosen = {s: a for s, a in adapters.items() if slots is None or s in slots}
    return comfy["CSA_ContentStyleGuider"].execute(
        model=model, clip=clip, positive=encode(clip, "a sks in the style of zwx"), negative=encode(clip, ""), cfg=cfg,
        lambda_content=lam_c, lambda_style=lam_s, content_token="sks", style_token="zwx", **PROMPTS, **chosen).args[0]


def sample(guider_object, steps=2, seed=9):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, 16, 16)
    sigmas = comfy.samplers.calculate_sigmas(guider_object.model_patcher.get_model_object("model_sampling"), "normal",
                                             steps)
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider_object.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=seed,
                                disable_pbar=True)


def weight_patched(comfy, model, *adapters):
    return comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapters[0], block_strengths="",
                                              **{f"adapter_{i + 2}": a for i, a in enumerate(adapters[1:])}).args[0]


def stock_guider(model, positive, negative, cfg):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(positive, negative)
    g.set_cfg(cfg)
    return g


def test_zero_lambdas_equal_stock_cfg_with_both_adapters(comfy, tiny_sd15, adapters):
    model, clip, _ = tiny_sd15
    stock_model = weight_patched(comfy, model, adapters["content_of_content"], adapters["style_of_style"])
    stock = sample(stock_guider(stock_model, encode(clip, "a sks in the style of zwx"), encode(clip, ""), 4.0), steps=3)
    ours = sample(guider(comfy, tiny_sd15, adapters), steps=3)
    assert not torch.allclose(stock, sample(stock_guider(model, encode(clip, "a sks in the style of zwx"),
                                                         encode(clip, ""), 4.0), steps=3), atol=1e-3)
    assert torch.allclose(ours, stock, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lam_c, lam_s", [(0.8, 0.0), (0.0, 1.3), (0.5, -0.7)])
def test_guidance_terms_equal_separate_model_calls(comfy, tiny_sd15, adapters, lam_c, lam_s):
    """One Euler step is linear in the prediction, so the sample equals the same combination of stock samples."""
    model, clip, _ = tiny_sd15
    base = sample(stock_guider(weight_patched(comfy, model, adapters["content_of_content"], adapters["style_of_style"]),
                               encode(clip, "a sks in the style of zwx"), encode(clip, ""), 4.0), steps=1)

    def single(slot, text):  # cfg 1: ComfyUI evaluates only the conditional prediction
        return sample(stock_guider(weight_patched(comfy, model, adapters[slot]), encode(clip, text), encode(clip, ""),
                                   1.0), steps=1)
    expected = base.clone()
    if lam_c:
        expected += lam_c * (single("content_of_content", "a sks") - single("content_of_style", "a zwx"))
    if lam_s:
        expected += lam_s * (single("style_of_style", "in the style of zwx") - single("style_of_content", "in the style of sks"))
    ours = sample(guider(comfy, tiny_sd15, adapters, lam_c, lam_s), steps=1)
    assert not torch.allclose(ours, base, atol=1e-3)
    assert torch.allclose(ours, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("lam_c, lam_s, rows_per_step", [(0.0, 0.0, 2), (1.0, 0.0, 4), (1.0, 1.0, 6)])
def test_each_enabled_term_costs_two_conditional_passes(comfy, tiny_sd15, adapters, lam_c, lam_s, rows_per_step):
    rows = []
    diffusion_model = tiny_sd15[0].model.diffusion_model
    handle = diffusion_model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        sample(guider(comfy, tiny_sd15, adapters, lam_c, lam_s), steps=2)
    finally:
        handle.remove()
    assert sum(rows) == 2 * rows_per_step


def test_missing_adapters_are_named(comfy, tiny_sd15, adapters):
    with pytest.raises(ValueError, match=r"lambda_content = 1.0 needs the adapters \['content_of_style'\]"):
        guider(comfy, tiny_sd15, adapters, lam_c=1.0, slots={"content_of_content", "style_of_style"})
    with pytest.raises(ValueError, match="connect at least content_of_content or style_of_style"):
        guider(comfy, tiny_sd15, adapters, slots={"content_of_style"})
    only_content = sample(guider(comfy, tiny_sd15, adapters, slots={"content_of_content"}), steps=1)
    assert torch.isfinite(only_content).all()


def test_compose_applies_the_content_block_of_one_and_the_style_block_of_the_other(comfy, tiny_sd15, adapters):
    model = tiny_sd15[0]
    content_file = comfy["CSA_LoadAdapter"].execute(adapter_name="consis_content_of_content.safetensors", strength=1.0,
                                                    part="whole file", role="from file").args[0]
    both = content_file.replace(modules={**content_file.modules, **adapters["style_of_content"].modules})
    patched, report = comfy["CSA_ComposeContentAndStyle"].execute(model=model, content_image_adapter=both,
                                                                  style_image_adapter=adapters["style_of_style"]).args
    keys = set(patched.patches)
    assert keys and all(f".{CONTENT_BLOCK}." in k or f".{STYLE_BLOCK}." in k for k in keys)
    reference = weight_patched(comfy, model, adapters["content_of_content"], adapters["style_of_style"])
    assert keys == set(reference.patches)
    from support.weights import patched_weights

    ours, expected = patched_weights(patched, keys), patched_weights(reference, keys)
    assert all(torch.equal(ours[k], expected[k]) for k in keys)
