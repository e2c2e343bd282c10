"""Every file layout, loaded and applied on the tiny SD1.5 model by real ComfyUI code.

Reference: W + strength · scale · up @ down per key, in float64, from factors built independently
(tests/support/lora_files.py); and ComfyUI's stock LoraLoader on the same file.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from support.lora_files import build_file
from support.weights import checkpoint_weights, patched_weights

pytestmark = pytest.mark.host

ATTENTION = [f"{block}.transformer_blocks.0.{attn}.{proj}" for block in ("input_blocks.1.1", "output_blocks.1.1")
             for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]
CONVS = ["input_blocks.1.1.proj_in", "output_blocks.0.1.proj_out", "input_blocks.1.0.in_layers.2"]
LAYOUT_MODULES = {"kohya": ATTENTION + CONVS, "kohya-diffusers": ATTENTION + CONVS, "comfy": ATTENTION + CONVS,
                  "peft": ATTENTION + CONVS, "b4m": ATTENTION, "processor": ATTENTION, "qr": ATTENTION + CONVS[:2]}
STOCK_READS_ALL = {"kohya", "kohya-diffusers", "comfy", "processor"}


@pytest.fixture(scope="module")
def shapes(tiny_sd15):
    return {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}


def write(comfy_base, name, tensors, metadata=None):
    save_file(tensors, str(comfy_base / "models" / "loras" / name), metadata=metadata)
    return name


def load(comfy, name, strength=1.0, part="whole file", role="from file", node="CSA_LoadAdapter"):
    args = dict(adapter_name=name, strength=strength, part=part)
    if node == "CSA_LoadAdapter":
        args["role"] = role
    return comfy[node].execute(**args).args[0]


def apply(comfy, model, *adapters, block_strengths="", clip=None):
    extra = {f"adapter_{i + 2}": a for i, a in enumerate(adapters[1:])}
    return comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapters[0], block_strengths=block_strengths,
                                              clip=clip, **extra).args


def assert_weights(patcher, base, expected: dict, atol=1e-5):
    got = patched_weights(patcher, expected)
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), base[key].double() + value, atol=atol, rtol=1e-5), key


@pytest.mark.parametrize("layout", sorted(LAYOUT_MODULES))
def test_layout_applies_exactly_and_matches_stock_loader(comfy, tiny_sd15, comfy_base, shapes, layout):
    model, clip, _ = tiny_sd15
    tensors, deltas = build_file(shapes, LAYOUT_MODULES[layout], layout, rank=4, alpha=2.0, seed=11)
    name = write(comfy_base, f"fmt_{layout}.safetensors", tensors)
    adapter = load(comfy, name, strength=0.6)
    assert len(adapter.modules) == len(deltas)
    ours, _, report = apply(comfy, model, adapter)
    assert f"{len(deltas)} of {len(deltas)} modules mapped onto SD15" in report
    assert set(ours.patches) == set(deltas)
    assert_weights(ours, checkpoint_weights(deltas), {k: 0.6 * d for k, d in deltas.items()})
    stock, _ = comfy["LoraLoader"]().load_lora(model, clip, name, 0.6, 0.0)
    assert set(stock.patches) <= set(ours.patches)
    if layout in STOCK_READS_ALL:
        assert set(stock.patches) == set(ours.patches)
    for key, value in patched_weights(stock, stock.patches).items():
        assert torch.equal(value, patched_weights(ours, [key])[key]), key
    assert model.patches == {}, "the input model must never be patched"


def test_two_adapters_with_block_strengths(comfy, tiny_sd15, comfy_base, shapes):
    model, _, _ = tiny_sd15
    content_t, content_d = build_file(shapes, ATTENTION, "kohya", rank=4, alpha=4.0, seed=21)
    style_t, style_d = build_file(shapes, ATTENTION, "peft", rank=8, alpha=None, seed=22)
    content = load(comfy, write(comfy_base, "blk_content.safetensors", content_t), 0.5, node="CSA_LoadContentAdapter")
    style = load(comfy, write(comfy_base, "blk_style.safetensors", style_t), 1.5, node="CSA_LoadStyleAdapter")
    assert (content.role, style.role) == ("content", "style")
    patched, _, _ = apply(comfy, model, content, style, block_strengths="output_blocks=0.25\ninput_blocks.1: 2")
    factor = {"output_blocks.1": 0.25, "input_blocks.1": 2.0}
    expected = {k: (0.5 * content_d[k] + 1.5 * style_d[k]) * factor[k.split(".")[1] + "." + k.split(".")[2]]
                for k in content_d}
    assert_weights(patched, checkpoint_weights(expected), expected)


def test_two_adapters_at_one_strength_on_one_weight_both_apply(comfy, tiny_sd15, comfy_base, shapes):
    """Patches are grouped by strength for ComfyUI; two adapters at the same strength on the same weight must not
    collapse into one (the second used to overwrite the first)."""
    model, _, _ = tiny_sd15
    first_t, first_d = build_file(shapes, ATTENTION, "kohya", rank=4, alpha=4.0, seed=31)
    second_t, second_d = build_file(shapes, ATTENTION, "comfy", rank=2, alpha=None, seed=32)
    first = load(comfy, write(comfy_base, "same_strength_a.safetensors", first_t), 1.0)
    second = load(comfy, write(comfy_base, "same_strength_b.safetensors", second_t), 1.0)
    patched, _, _ = apply(comfy, model, first, second)
    expected = {k: first_d[k] + second_d[k] for k in first_d}
    assert_weights(patched, checkpoint_weights(expected), expected)
    assert all(len(patched.patches[k]) == 2 for k in expected)


def test_zero_block_strength_and_zero_strength_leave_weights_alone(comfy, tiny_sd15, comfy_base, shapes):
    model, _, _ = tiny_sd15
    tensors, _ = build_file(shapes, ATTENTION, "kohya", rank=2, alpha=1.0, seed=5)
    adapter = load(comfy, write(comfy_base, "zero.safetensors", tensors))
    assert apply(comfy, model, adapter.replace(strength=0.0))[0] is model
    patched = apply(comfy, model, adapter, block_strengths="input_blocks=0")[0]
    assert all(not k.startswith("diffusion_model.input_blocks") for k in patched.patches)


def test_text_encoder_modules_patch_the_clip(comfy, tiny_sd15, comfy_base):
    model, clip, _ = tiny_sd15
    clip_sd = clip.cond_stage_model.state_dict()
    g = torch.Generator().manual_seed(3)
    q_key = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    k_key = "clip_l.transformer.text_model.encoder.layers.1.self_attn.k_proj.weight"
    up1, down1, up2, down2 = (torch.randn(768, 4, generator=g), torch.randn(4, 768, generator=g) / 30,
                              torch.randn(768, 4, generator=g), torch.randn(4, 768, generator=g) / 30)
    tensors = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up1,
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down1,
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
               "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_B.weight": up2,
               "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora_A.weight": down2}
    adapter = load(comfy, write(comfy_base, "te.safetensors", tensors))
    with pytest.raises(ValueError, match="te.safetensors: this adapter does not match.*connect the CLIP"):
        apply(comfy, model, adapter)
    _, patched_clip, report = apply(comfy, model, adapter, clip=clip)
    assert "2 of 2 modules mapped" in report
    expected = {q_key: (up1.double() @ down1.double()) * 0.5, k_key: up2.double() @ down2.double()}
    assert_weights(patched_clip.patcher, clip_sd, expected)

