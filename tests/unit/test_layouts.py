"""core.layouts: every file key to (layout, module, factor part); one layout per module spelling."""
import pytest
import torch

from core.formats import adapter_from_tensors
from core.layouts import LAYOUTS, group_by_module, save_names_without_model, split_key


@pytest.mark.parametrize("key, layout, module, part", [
    ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "kohya", "lora_unet_input_blocks_1_1_proj_in", "down"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight", "kohya",
     "lora_te1_text_model_encoder_layers_0_mlp_fc1", "up"),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", "diffusers", "unet.down_blocks.0.attentions.0.proj_in", "up"),
    ("unet.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight", "b4m",
     "unet.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "down"),
    ("diffusion_model.out.2.alpha", "comfy", "diffusion_model.out.2", "alpha"),
    ("input_blocks.1.1.proj_in.lora_up.weight", "comfy-bare", "input_blocks.1.1.proj_in", "up"),
    ("x.to_q.lora.delta_r.weight", "qr-lora", "x.to_q", "delta_r"),
    ("diffusion_model.x.to_q.lora.q.weight", "qr-lora", "diffusion_model.x.to_q", "q"),
    ("x.to_q.lora.base_r.weight", "qr-lora", "x.to_q", "base_r"),
    ("up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_q_lora.up.weight", "diffusers",
     "up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_q", "up"),
    ("base_model.model.mid_block.attentions.0.proj_in.lora_B.default.weight", "diffusers",
     "base_model.model.mid_block.attentions.0.proj_in", "up"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight", "diffusers",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "up"),
    ("x.lora.up.weight", "other", "x", "up"),
])
def test_split_key(key, layout, module, part):
    found = split_key(key)
    assert (found[0].name, found[1], found[2]) == (layout, module, part)


@pytest.mark.parametrize("key", ["x.weight", ".alpha", "lora_unet_a.lora_magnitude_vector", ".hada_w1_a"])
def test_keys_that_are_no_factor(key):
    assert split_key(key) is None


def test_every_layout_is_one_registry_entry_with_a_method_and_normaliser():
    names = [layout.name for layout in LAYOUTS]
    assert len(names) == len(set(names))
    assert all(layout.method and layout.suffixes and callable(layout.normalise) for layout in LAYOUTS)


def test_group_by_module_separates_unknown_keys_and_picks_the_method():
    tensors = {"m.lora_up.weight": torch.zeros(2, 1), "m.lora_down.weight": torch.zeros(1, 2),
               "m.alpha": torch.tensor(1.0), "stray": torch.zeros(1)}
    grouped = group_by_module(tensors)
    assert set(grouped.parts) == {"m"} and set(grouped.parts["m"]) == {"up", "down", "alpha"}
    assert grouped.unknown == ["stray"] and grouped.method == "lora"
    b4m = group_by_module({"unet.unet.up_blocks.0.proj_in.lora_A.weight": torch.zeros(1, 2)})
    assert b4m.method == "b4m" and b4m.layout_names == ["b4m"]


def test_bare_comfy_names_read_as_generic_names():
    up, down = torch.randn(4, 2), torch.randn(2, 3)
    adapter = adapter_from_tensors({"input_blocks.1.1.proj_in.lora_up.weight": up,
                                    "input_blocks.1.1.proj_in.lora_down.weight": down}, {})
    assert list(adapter.modules) == ["diffusion_model.input_blocks.1.1.proj_in"]
    assert adapter.metadata["csa.layouts"] == '["comfy-bare"]'


def test_save_names_without_a_model():
    assert save_names_without_model(["diffusion_model.a.b"], "kohya") == {"diffusion_model.a.b": "lora_unet_a_b"}
    assert save_names_without_model(["lora_unet_a"], "kohya") == {"lora_unet_a": "lora_unet_a"}
    with pytest.raises(ValueError, match="not in comfy form"):
        save_names_without_model(["lora_unet_a"], "comfy")
