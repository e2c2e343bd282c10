import pytest
import torch

from core.lora_keys import group_by_module, keys_of_modules, split_key


@pytest.mark.parametrize("key, expected", [
    ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", ("lora_unet_input_blocks_1_1_proj_in", "down")),
    ("lora_unet_input_blocks_1_1_proj_in.lora_up.weight", ("lora_unet_input_blocks_1_1_proj_in", "up")),
    ("unet.down_blocks.0.attentions.0.proj_in.lora_B.weight", ("unet.down_blocks.0.attentions.0.proj_in", "up")),
    ("unet.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight",
     ("unet.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q", "down")),
    ("diffusion_model.out.2.alpha", ("diffusion_model.out.2", "alpha")),
    ("x.to_q.lora.delta_r.weight", ("x.to_q", "delta_r")),
    ("x.to_q.lora.q.weight", ("x.to_q", "q")),
    ("x.to_q.lora.base_r.weight", ("x.to_q", "base_r")),
    ("x.processor.to_q_lora.up.weight", ("x.processor.to_q", "up")),
    ("x.lora_B.default.weight", ("x", "up")),
    ("x.lora.up.weight", ("x", "up")),
    ("x.weight", None),
    (".alpha", None),
])
def test_split_key(key, expected):
    assert split_key(key) == expected


def test_group_by_module_separates_unknown_keys():
    tensors = {"m.lora_up.weight": torch.zeros(2, 1), "m.lora_down.weight": torch.zeros(1, 2),
               "m.alpha": torch.tensor(1.0), "stray": torch.zeros(1)}
    modules, unknown = group_by_module(tensors)
    assert set(modules) == {"m"} and set(modules["m"]) == {"up", "down", "alpha"}
    assert unknown == ["stray"]
    assert set(keys_of_modules(tensors, {"m"})) == {"m.lora_up.weight", "m.lora_down.weight", "m.alpha"}
