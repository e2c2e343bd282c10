"""Save Adapter round trips, and specific errors for bad files and bad parameters."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from support.lora_files import build_file
from support.weights import checkpoint_weights, patched_weights

pytestmark = pytest.mark.host

MODULES = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "output_blocks.1.1.transformer_blocks.0.attn2.to_v",
           "input_blocks.1.1.proj_in", "input_blocks.1.0.in_layers.2"]


@pytest.fixture(scope="module")
def shapes(tiny_sd15):
    return {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}


@pytest.fixture
def loras(comfy_base):
    return comfy_base / "models" / "loras"


def load(comfy, name, strength=1.0):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part="whole file",
                                            role="from file").args[0]


def save(comfy, adapter, filename, key_form="comfy", model=None, subfolder="", overwrite=False):
    return comfy["CSA_SaveAdapter"].execute(adapter=adapter, filename=filename, subfolder=subfolder,
                                             key_form=key_form, overwrite=overwrite, model=model).args[0]


def applied(comfy, model, adapter):
    return comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args[0]


@pytest.mark.parametrize("layout", ["peft", "kohya", "qr"])
@pytest.mark.parametrize("key_form", ["comfy", "kohya"])
def test_saved_file_reloads_identically_and_loads_in_stock_loader(comfy, tiny_sd15, loras, shapes, layout, key_form):
    model, clip, _ = tiny_sd15
    tensors, deltas = build_file(shapes, MODULES, layout, rank=3, alpha=1.5, seed=31)
    save_file(tensors, str(loras / f"src_{layout}.safetensors"))
    original = load(comfy, f"src_{layout}.safetensors").replace(role="style", method="test-method")
    path = save(comfy, original, f"saved_{layout}_{key_form}", key_form, model=model, subfolder="csa_tests")
    name = f"csa_tests/saved_{layout}_{key_form}.safetensors"
    assert path.endswith(name)
    with safe_open(path, "pt") as handle:
        metadata, keys = handle.metadata(), list(handle.keys())
    assert metadata["csa.role"] == "style" and metadata["csa.method"] == "test-method"
    expected_prefix = "diffusion_model." if key_form == "comfy" else "lora_unet_"
    assert all(k.startswith(expected_prefix) for k in keys)
    if key_form == "kohya":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in keys
    reloaded = load(comfy, name)
    assert reloaded.role == "style"
    ours = patched_weights(applied(comfy, model, original), deltas)
    again = patched_weights(applied(comfy, model, reloaded), deltas)
    stock = patched_weights(comfy["LoraLoader"]().load_lora(model, clip, name, 1.0, 0.0)[0], deltas)
    base = checkpoint_weights(deltas)
    for key, delta in deltas.items():
        assert torch.allclose(ours[key].double(), base[key].double() + delta, atol=1e-5), key
        assert torch.equal(ours[key], again[key]), key
        assert torch.equal(ours[key], stock[key]), key


def test_save_refuses_to_overwrite_and_escaping_names(comfy, loras, shapes):
    tensors, _ = build_file(shapes, MODULES[:1], "comfy", rank=2, alpha=None, seed=1)
    save_file(tensors, str(loras / "ow_src.safetensors"))
    adapter = load(comfy, "ow_src.safetensors")
    path = save(comfy, adapter, "ow_target")
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="ow_target.safetensors already exists"):
        save(comfy, adapter.replace(strength=2.0, role="content"), "ow_target")
    assert open(path, "rb").read() == before
    save(comfy, adapter.replace(role="content"), "ow_target", overwrite=True)
    assert load(comfy, "ow_target.safetensors").role == "content"
    for filename, subfolder in (("../escape", ""), ("x", "../../up"), ("/abs/x", ""), ("", "")):
        with pytest.raises(ValueError, match="filename|subfolder"):
            save(comfy, adapter, filename, subfolder=subfolder)
    assert not (loras.parent / "escape.safetensors").exists()


def test_renaming_without_a_model_is_refused_clearly(comfy, loras, shapes):
    tensors, _ = build_file(shapes, MODULES[:1], "peft", rank=2, alpha=None, seed=2)
    save_file(tensors, str(loras / "peft_nomodel.safetensors"))
    with pytest.raises(ValueError, match="connect the model"):
        save(comfy, load(comfy, "peft_nomodel.safetensors"), "peft_nomodel_out")


def test_comfy_form_with_text_encoder_modules_saves_without_a_model(comfy, tiny_sd15, loras):
    """Generic names (diffusion_model.* and text_encoders.*) are already the comfy form; kohya needs the model."""
    _, clip, _ = tiny_sd15
    unet_key = "diffusion_model." + MODULES[0]
    text_key = next(k for k in clip.cond_stage_model.state_dict() if k.endswith("self_attn.q_proj.weight"))
    generator = torch.Generator().manual_seed(4)
    tensors = {}
    for name, width in ((unet_key, 320), ("text_encoders." + text_key[: -len(".weight")], 768)):
        tensors[f"{name}.lora_up.weight"] = torch.randn(width, 2, generator=generator)
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, width, generator=generator)
    save_file(tensors, str(loras / "generic_with_text.safetensors"))
    adapter = load(comfy, "generic_with_text.safetensors")
    path = save(comfy, adapter, "generic_with_text_resaved", overwrite=True)
    assert sorted(load(comfy, "generic_with_text_resaved.safetensors").modules) == sorted(adapter.modules)
    assert path.endswith("generic_with_text_resaved.safetensors")
    with pytest.raises(ValueError, match="not in kohya form; connect the model"):
        save(comfy, adapter, "generic_with_text_kohya", key_form="kohya")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated: the header describes"),
    ("nan", "tensor '.*' contains NaN"),
    ("text", "not a safetensors file"),
])
def test_damaged_files_give_specific_errors(comfy, loras, shapes, damage, message):
    tensors, _ = build_file(shapes, MODULES[:2], "kohya", rank=2, alpha=1.0, seed=3)
    path = loras / f"damaged_{damage}.safetensors"
    if damage == "nan":
        next(iter(tensors.values())).view(-1)[0] = math.nan
    save_file(tensors, str(path))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    if damage == "text":
        path.write_text("this is not a tensor file")
    with pytest.raises(ValueError, match=f"damaged_{damage}.safetensors: ({message})"):
        load(comfy, path.name)


def test_factor_problems_name_the_module(comfy, loras):
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(8, 3), "lora_unet_x.lora_down.weight": torch.zeros(2, 8)},
              str(loras / "rank_mismatch.safetensors"))
    with pytest.raises(ValueError, match="rank_mismatch.safetensors: module 'lora_unet_x': rank mismatch"):
        load(comfy, "rank_mismatch.safetensors")
    save_file({"lora_unet_y.lora_up.weight": torch.zeros(8, 3)}, str(loras / "half.safetensors"))
    with pytest.raises(ValueError, match="half.safetensors: module 'lora_unet_y' has no down factor"):
        load(comfy, "half.safetensors")
    save_file({"something.weight": torch.zeros(3)}, str(loras / "not_lora.safetensors"))
    with pytest.raises(ValueError, match="not_lora.safetensors: no adapter tensors found"):
        load(comfy, "not_lora.safetensors")
    save_file({"lora_unet_z.lora_up.weight": torch.zeros(8, 0), "lora_unet_z.lora_down.weight": torch.zeros(0, 8)},
              str(loras / "rank0.safetensors"))
    with pytest.raises(ValueError, match=r"rank0.safetensors: module 'lora_unet_z': empty factors .* rank 0"):
        load(comfy, "rank0.safetensors")
    save_file({"lora_unet_w.hada_w1_a": torch.zeros(8, 0), "lora_unet_w.hada_w1_b": torch.zeros(0, 8),
               "lora_unet_w.hada_w2_a": torch.zeros(8, 0), "lora_unet_w.hada_w2_b": torch.zeros(0, 8)},
              str(loras / "loha_rank0.safetensors"))
    with pytest.raises(ValueError, match=r"loha_rank0.safetensors: module 'lora_unet_w': hada_w1_a, .* are empty "
                                         r"\(rank 0\)"):
        load(comfy, "loha_rank0.safetensors")


def test_shape_mismatch_names_module_and_both_shapes(comfy, tiny_sd15, loras):
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file({f"{name}.lora_up.weight": torch.zeros(320, 2), f"{name}.lora_down.weight": torch.zeros(2, 640)},
              str(loras / "wrong_shape.safetensors"))
    adapter = load(comfy, "wrong_shape.safetensors")
    with pytest.raises(ValueError, match=rf"wrong_shape.safetensors: module '{name}' does not fit .*\(320, 640\).*"
                                         rf"\(320, 320\)"):
        applied(comfy, tiny_sd15[0], adapter)


def test_bad_block_strengths_are_named(comfy, tiny_sd15, loras, shapes):
    tensors, _ = build_file(shapes, MODULES[:1], "kohya", rank=2, alpha=1.0, seed=4)
    save_file(tensors, str(loras / "blk.safetensors"))
    adapter = load(comfy, "blk.safetensors")
    with pytest.raises(ValueError, match="cannot read 'input_blocks.1 = lots'"):
        comfy["CSA_ApplyAdapters"].execute(model=tiny_sd15[0], adapter=adapter,
                                           block_strengths="input_blocks.1 = lots")
    with pytest.raises(ValueError, match=r"block strengths name \['up_blocks.0'\], which this model does not have"):
        comfy["CSA_ApplyAdapters"].execute(model=tiny_sd15[0], adapter=adapter, block_strengths="up_blocks.0=1")
