"""Apply Adapter on the tiny SD1.5 model, loaded and patched by real ComfyUI code."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from support.weights import kohya_module, patched_weights

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def loras_dir(comfy_base):
    return comfy_base / "models" / "loras"


def random_kohya_lora(model, rank: int, alpha: float, seed: int, keys_filter=lambda k: True):
    """A kohya LoRA on every matching 2-D / 4-D weight of the model, plus its dense reference deltas."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for key, weight in model.model.state_dict().items():
        if not (key.startswith("diffusion_model.") and key.endswith(".weight") and weight.ndim in (2, 4)
                and keys_filter(key)):
            continue
        out_dim, in_dim = weight.shape[0], weight.shape[1]
        kernel = weight.shape[2:]
        down = torch.randn(rank, in_dim, *kernel, generator=g)
        up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=g)
        module = kohya_module(key)
        tensors[f"{module}.lora_down.weight"] = down
        tensors[f"{module}.lora_up.weight"] = up
        tensors[f"{module}.alpha"] = torch.tensor(alpha)
        deltas[key] = (up.flatten(1).double() @ down.flatten(1).double()).reshape(weight.shape) * (alpha / rank)
    return tensors, deltas


def is_attention(key):
    return ".attn" in key


def test_apply_adapter_equals_dense_reference_and_stock_loader(comfy, tiny_sd15, loras_dir):
    model, clip, _ = tiny_sd15
    tensors, deltas = random_kohya_lora(model, rank=4, alpha=2.0, seed=1,
                                        keys_filter=lambda k: is_attention(k) or "proj_in" in k)
    save_file(tensors, str(loras_dir / "host_kohya.safetensors"))
    strength = 0.7
    ours, _, report = comfy["CSA_ApplyAdapters"].execute(model, "host_kohya.safetensors", strength, clip=None).args
    stock, _ = comfy["LoraLoader"]().load_lora(model, clip, "host_kohya.safetensors", strength, 0.0)
    assert f"{len(deltas)} of {len(deltas)} modules mapped onto SD15" in report
    base = model.model.state_dict()
    our_weights = patched_weights(ours, deltas)
    stock_weights = patched_weights(stock, deltas)
    for key, delta in deltas.items():
        reference = base[key].double() + strength * delta
        assert torch.allclose(our_weights[key].double(), reference, atol=1e-5, rtol=1e-5), key
        assert torch.equal(our_weights[key], stock_weights[key]), key
    assert model.patches == {}, "the input model must never be patched"


def test_zero_strength_returns_the_input_model(comfy, tiny_sd15, loras_dir):
    model, _, _ = tiny_sd15
    tensors, _ = random_kohya_lora(model, rank=2, alpha=2.0, seed=2, keys_filter=is_attention)
    save_file(tensors, str(loras_dir / "host_zero.safetensors"))
    out = comfy["CSA_ApplyAdapters"].execute(model, "host_zero.safetensors", 0.0).args
    assert out[0] is model


def test_partly_matching_adapter_reports_unmapped_modules(comfy, tiny_sd15, loras_dir):
    model, _, _ = tiny_sd15
    tensors, deltas = random_kohya_lora(model, rank=2, alpha=1.0, seed=3, keys_filter=is_attention)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(4, 2)
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(2, 4)
    save_file(tensors, str(loras_dir / "host_partial.safetensors"))
    patched, _, report = comfy["CSA_ApplyAdapters"].execute(model, "host_partial.safetensors", 1.0).args
    assert f"{len(deltas)} of {len(deltas) + 1} modules mapped" in report
    assert "unmapped modules: lora_unet_no_such_block_to_q" in report
    assert set(patched.patches) == set(deltas)


def test_adapter_for_another_model_is_a_clear_error(comfy, tiny_sd15, loras_dir):
    model, _, _ = tiny_sd15
    save_file({"lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k.lora_up.weight": torch.zeros(8, 2),
               "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k.lora_down.weight": torch.zeros(2, 8)},
              str(loras_dir / "host_other.safetensors"))
    with pytest.raises(ValueError, match="host_other.safetensors: this adapter does not match this model \\(SD15\\)"):
        comfy["CSA_ApplyAdapters"].execute(model, "host_other.safetensors", 1.0)
