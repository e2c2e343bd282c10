"""core.adapter, core.formats, core.layouts, core.blocks and core.binding on synthetic data (no ComfyUI)."""
import pytest
import torch

from core.adapter import Adapter, LowRank
from core.blocks import (block_of, parse_block_strengths, select_b_lora_part, strength_of_block, touched_blocks)
from core.binding import bind, check_architecture, shapes_fit
from core.formats import adapter_from_tensors, tensors_from_modules
from core.layouts import normalise_module_name, save_names_for


def factors(out_dim, in_dim, rank, kernel=(), alpha=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=g, dtype=torch.float64)
    down = torch.randn(rank, in_dim, *kernel, generator=g, dtype=torch.float64)
    return LowRank(up=up, down=down, alpha=alpha)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
@pytest.mark.parametrize("alpha", [None, 2.0, 16.0])
def test_delta_equals_dense_reference(kernel, alpha):
    f = factors(6, 5, 4, kernel, alpha)
    reference = torch.einsum("or,ri...->oi...", f.up.flatten(1), f.down) * (1.0 if alpha is None else alpha / 4)
    assert f.delta(torch.float64).shape == (6, 5, *kernel)
    assert torch.allclose(f.delta(torch.float64), reference, atol=1e-12)


@pytest.mark.parametrize("name, expected", [
    ("lora_unet_input_blocks_1_1_proj_in", "lora_unet_input_blocks_1_1_proj_in"),
    ("diffusion_model.out.2", "diffusion_model.out.2"),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("unet.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
     "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"),
    ("up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_out",
     "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0"),
    ("base_model.model.mid_block.attentions.0.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
    ("middle_block.1.proj_out", "diffusion_model.middle_block.1.proj_out"),
])
def test_module_names_are_normalised_for_the_key_map(name, expected):
    assert normalise_module_name(name) == expected


def test_adapter_from_tensors_reads_alpha_metadata_and_qr():
    f = factors(4, 3, 2, alpha=1.0)
    tensors = {"lora_unet_a.lora_up.weight": f.up, "lora_unet_a.lora_down.weight": f.down,
               "lora_unet_a.alpha": torch.tensor(1.0), "junk": torch.zeros(1)}
    adapter = adapter_from_tensors(tensors, {"csa.role": "content", "csa.method": "b4m"}, source="f.safetensors")
    assert (adapter.role, adapter.method, adapter.modules["lora_unet_a"].scale) == ("content", "b4m", 0.5)
    assert adapter.ignored_keys == {"junk": "unknown kind"}
    assert adapter_from_tensors(tensors, {"csa.role": "content"}, role="style").role == "style"
    qr = {"m.lora.q.weight": f.up, "m.lora.delta_r.weight": f.down, "m.lora.base_r.weight": f.down * 2}
    adapter = adapter_from_tensors(qr, {})
    assert adapter.method == "qr-lora" and torch.equal(adapter.modules["m"].extras["base_r"], f.down * 2)
    assert torch.allclose(adapter.modules["m"].delta(torch.float64), f.up @ f.down)
    written = tensors_from_modules(adapter.modules, {"m": "m"}, qr_form=True)
    assert set(written) == set(qr)


def test_peft_without_alpha_has_scale_one_and_doubled_prefix_is_b4m():
    f = factors(4, 3, 2)
    adapter = adapter_from_tensors({"unet.unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": f.up,
                                    "unet.unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": f.down}, {})
    assert adapter.method == "b4m"
    assert adapter.modules["lora_unet_down_blocks_0_attentions_0_proj_in"].scale == 1.0


def test_blocks():
    assert block_of("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == "input_blocks.4"
    assert block_of("diffusion_model.middle_block.1.proj_in.weight") == "middle_block"
    assert block_of("diffusion_model.out.2.weight") == "out"
    assert block_of("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == "text_encoder"
    assert touched_blocks(["lora_unet_up_blocks_0_attentions_1_x", "lora_te_text_model_a",
                           "diffusion_model.output_blocks.11.1.x"]) == {"up_blocks.0", "text_encoder", "output_blocks.11"}
    strengths = parse_block_strengths("output_blocks=0.5\n output_blocks.1: 2, input_blocks.10=-1e-1")
    assert strengths == {"output_blocks": 0.5, "output_blocks.1": 2.0, "input_blocks.10": -0.1}
    assert strength_of_block("output_blocks.1", strengths) == 2.0
    assert strength_of_block("output_blocks.11", strengths) == 0.5
    assert strength_of_block("input_blocks.1", strengths) == 1.0
    assert strength_of_block("input_blocks.10", strengths) == -0.1


def test_b_lora_selection_takes_either_spelling_and_only_that_block():
    f = factors(4, 3, 2)
    adapter = Adapter(modules={"lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": f,
                               "diffusion_model.output_blocks.0.1.proj_in": f,
                               "lora_unet_up_blocks_0_attentions_1_proj_in": f,
                               "diffusion_model.output_blocks.0.10.proj_in": f})
    assert set(select_b_lora_part(adapter, "content").modules) == {
        "lora_unet_up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "diffusion_model.output_blocks.0.1.proj_in"}
    assert set(select_b_lora_part(adapter, "style").modules) == {"lora_unet_up_blocks_0_attentions_1_proj_in"}


def test_bind_and_architecture_checks():
    f = factors(4, 3, 2)
    adapter = Adapter(modules={"a": f, "b": f, "c": factors(4, 3, 2, kernel=(3, 3))}, source="x")
    key_map = {"a": "diffusion_model.a.weight", "c": "diffusion_model.c.weight", "b": ("offset", 1)}
    shapes = {"diffusion_model.a.weight": (4, 3, 1, 1), "diffusion_model.c.weight": (4, 3, 3, 3)}
    binding = bind(adapter, key_map, shapes)
    assert set(binding.targets) == set(shapes) and binding.unmatched == ["b"]
    with pytest.raises(ValueError, match=r"x: module 'a' does not fit diffusion_model.a.weight"):
        bind(adapter, key_map, {**shapes, "diffusion_model.a.weight": (4, 6)})
    assert shapes_fit((4, 3), (4, 3, 1, 1)) and not shapes_fit((4, 3), (3, 4))
    sdxl = Adapter(modules={"lora_unet_x_attn2_to_k": factors(640, 2048, 2)}, source="sdxl.safetensors")
    with pytest.raises(ValueError, match=r"made for SDXL \(cross-attention width 2048\), but the model is SD15"):
        check_architecture(sdxl, "SD15", 768)
    check_architecture(sdxl, "SDXL", 2048)


def test_file_names_invert_the_key_map():
    key_map = {"lora_unet_input_blocks_1_1_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
               "lora_unet_down_blocks_0_attentions_0_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
               "diffusion_model.input_blocks.1.1.proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
               "lora_unet_out_2": "diffusion_model.out.2.weight", "diffusion_model.out.2": "diffusion_model.out.2.weight",
               "lora_te_text_model_encoder_layers_0_mlp_fc1": "clip_l.t.fc1.weight",
               "lora_te1_text_model_encoder_layers_0_mlp_fc1": "clip_l.t.fc1.weight",
               "text_encoders.clip_l.t.fc1": "clip_l.t.fc1.weight"}
    keys = set(key_map.values())
    assert save_names_for(keys, key_map, "kohya") == {
        "diffusion_model.input_blocks.1.1.proj_in.weight": "lora_unet_down_blocks_0_attentions_0_proj_in",
        "diffusion_model.out.2.weight": "lora_unet_out_2", "clip_l.t.fc1.weight": "lora_te_text_model_encoder_layers_0_mlp_fc1"}
    assert save_names_for(keys, key_map, "comfy")["clip_l.t.fc1.weight"] == "text_encoders.clip_l.t.fc1"
    with pytest.raises(ValueError, match="key form must be one of"):
        save_names_for(keys, key_map, "a1111")


def test_slices_of_a_fused_weight_bind_and_join_exactly():
    """FLUX's to_q / to_k / to_v land on thirds of one qkv weight (ComfyUI's (key, (dim, offset, size)) targets): each
    is checked against its slice, overlaps are refused, and the joined LowRank is each slice's ΔW at its rows."""
    q, k, v = factors(2, 3, 2, seed=1), factors(2, 3, 1, seed=2), LowRank(up=torch.randn(2, 2), down=torch.randn(2, 3),
                                                                          alpha=1.0)
    adapter = Adapter(modules={"to_q": q, "to_k": k, "to_v": v}, source="flux.safetensors")
    qkv = "diffusion_model.qkv.weight"
    key_map = {"to_q": (qkv, (0, 0, 2)), "to_k": (qkv, (0, 2, 2)), "to_v": (qkv, (0, 4, 2))}
    binding = bind(adapter, key_map, {qkv: (6, 3)})
    assert binding.matched_count == 3 and binding.sliced == {qkv: ["to_q", "to_k", "to_v"]}
    label, joined = binding.whole_weight_targets({qkv: (6, 3)})[qkv]
    expected = torch.cat([q.delta(torch.float64), k.delta(torch.float64), v.delta(torch.float64)])
    assert label == "to_q + to_k + to_v" and torch.allclose(joined.delta(torch.float64), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"modules 'to_q' and 'to_k' both patch diffusion_model.qkv.weight \(slices"):
        bind(adapter, {**key_map, "to_k": (qkv, (0, 1, 2))}, {qkv: (6, 3)})
    with pytest.raises(ValueError, match=r"'to_q' does not fit diffusion_model.qkv.weight slice \(0, 0, 2\)"):
        bind(adapter, key_map, {qkv: (6, 4)})
    outside = bind(adapter, {**key_map, "to_v": (qkv, (0, 5, 2))}, {qkv: (6, 3)})  # rows 5..6 of 6: not a target
    assert outside.unmatched == ["to_v"]


def test_a_change_function_target_acts_on_the_rows_of_up():
    f = factors(4, 3, 2, seed=3)
    swap = lambda w: torch.cat(w.chunk(2, 0)[::-1])  # noqa: E731  (ComfyUI's swap_scale_shift, as FLUX's norm_out)
    binding = bind(Adapter(modules={"norm_out": f}), {"norm_out": ("w", None, swap)}, {"w": (4, 3)})
    (_, joined), = binding.whole_weight_targets({"w": (4, 3)}).values()
    assert torch.allclose(joined.delta(torch.float64), swap(f.delta(torch.float64)))
