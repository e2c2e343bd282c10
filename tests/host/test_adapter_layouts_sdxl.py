"""SDXL key layouts (meta device): B-LoRA / ConsisLoRA block splits and architecture mismatches."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.host

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def b_lora_file(shapes, rank=4, seed=0, prefix="unet."):
    """A B-LoRA file in diffusers/PEFT naming on SDXL's up_blocks.0.attentions.0 and .1 (10 transformers each)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for attention, native in ((0, "output_blocks.0.1"), (1, "output_blocks.1.1")):
        for t in range(10):
            for attn in ("attn1", "attn2"):
                for proj in PROJECTIONS:
                    out_dim, in_dim = shapes[f"diffusion_model.{native}.transformer_blocks.{t}.{attn}.{proj}.weight"]
                    name = f"{prefix}up_blocks.0.attentions.{attention}.transformer_blocks.{t}.{attn}.{proj}"
                    tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_dim, generator=g)
                    tensors[f"{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=g)
    return tensors


@pytest.fixture(scope="module")
def sdxl_shapes(sdxl_meta):
    return {k: tuple(v.shape) for k, v in sdxl_meta.model.state_dict().items()}


@pytest.mark.parametrize("part, native_block", [("B-LoRA content block", "output_blocks.0.1"),
                                                ("B-LoRA style block", "output_blocks.1.1")])
@pytest.mark.parametrize("prefix", ["unet.", "unet.unet.", ""])
def test_b_lora_part_selects_one_block_and_binds_to_sdxl(comfy, comfy_base, sdxl_meta, sdxl_shapes, part, native_block,
                                                        prefix):
    name = f"blora_{prefix.replace('.', '_')}.safetensors"
    save_file(b_lora_file(sdxl_shapes, prefix=prefix), str(comfy_base / "models" / "loras" / name))
    adapter = comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=1.0, part=part, role="from file").args[0]
    assert len(adapter.modules) == 80
    patched, _, report = comfy["CSA_ApplyAdapters"].execute(model=sdxl_meta, adapter=adapter, block_strengths="").args
    assert "80 of 80 modules mapped onto SDXL" in report
    assert len(patched.patches) == 80
    assert all(k.startswith(f"diffusion_model.{native_block}.transformer_blocks.") for k in patched.patches)


def test_whole_b_lora_file_has_both_blocks(comfy, comfy_base, sdxl_meta, sdxl_shapes):
    save_file(b_lora_file(sdxl_shapes, seed=1), str(comfy_base / "models" / "loras" / "blora_whole.safetensors"))
    adapter = comfy["CSA_LoadAdapter"].execute(adapter_name="blora_whole.safetensors", strength=1.0,
                                               part="whole file", role="style").args[0]
    assert adapter.role == "style" and len(adapter.modules) == 160
    info = comfy["CSA_AdapterInfo"].execute(adapter=adapter, model=sdxl_meta).args[0]
    assert "160 of 160 modules mapped onto SDXL" in info
    assert "up_blocks.0" in info and "parameters" in info


def test_b_lora_part_missing_from_file_is_named(comfy, comfy_base, tiny_sd15):
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 2),
               "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 320)},
              str(comfy_base / "models" / "loras" / "no_blocks.safetensors"))
    with pytest.raises(ValueError, match=r"no_blocks.safetensors: no module in the B-LoRA style block"):
        comfy["CSA_LoadAdapter"].execute(adapter_name="no_blocks.safetensors", strength=1.0,
                                         part="B-LoRA style block", role="from file")


def test_sdxl_adapter_on_sd15_names_both(comfy, comfy_base, tiny_sd15, sdxl_shapes):
    save_file(b_lora_file(sdxl_shapes, seed=2), str(comfy_base / "models" / "loras" / "sdxl_on_sd15.safetensors"))
    adapter = comfy["CSA_LoadAdapter"].execute(adapter_name="sdxl_on_sd15.safetensors", strength=1.0,
                                               part="whole file", role="from file").args[0]
    with pytest.raises(ValueError, match=r"sdxl_on_sd15.safetensors: made for SDXL \(cross-attention width 2048\), "
                                         r"but the model is SD15 \(width 768\)"):
        comfy["CSA_ApplyAdapters"].execute(model=tiny_sd15[0], adapter=adapter, block_strengths="")


def test_sd15_adapter_on_sdxl_names_both(comfy, comfy_base, tiny_sd15, sdxl_meta):
    g = torch.Generator().manual_seed(4)
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_up.weight": torch.randn(320, 2, generator=g),
               f"{name}.lora_down.weight": torch.randn(2, 768, generator=g)},
              str(comfy_base / "models" / "loras" / "sd15_on_sdxl.safetensors"))
    adapter = comfy["CSA_LoadAdapter"].execute(adapter_name="sd15_on_sdxl.safetensors", strength=1.0,
                                               part="whole file", role="from file").args[0]
    with pytest.raises(ValueError, match=r"made for SD1.x \(cross-attention width 768\), but the model is SDXL"):
        comfy["CSA_ApplyAdapters"].execute(model=sdxl_meta, adapter=adapter, block_strengths="")
