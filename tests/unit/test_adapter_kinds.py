"""Kinds beside plain low-rank factors (core.layouts, core.formats, core.binding, core.dense), no ComfyUI."""
import pytest
import torch

from core.adapter import LowRank
from core.binding import bind
from core.dense import carried_diffs, exact_lowrank, sum_diffs
from core.formats import adapter_from_tensors, tensors_from_module_tensors
from core.layouts import split_key


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("key, layout, module, part", [
    ("lora_unet_a_b.hada_w1_a", "kohya", "lora_unet_a_b", "hada_w1_a"),
    ("lycoris_a_b.lokr_w2", "other", "lycoris_a_b", "lokr_w2"),
    ("diffusion_model.a.oft_blocks", "comfy", "diffusion_model.a", "oft_blocks"),
    ("diffusion_model.a.a1.weight", "comfy", "diffusion_model.a", "a1.weight"),
    ("diffusion_model.a.diff", "comfy", "diffusion_model.a", "diff"),
    ("diffusion_model.a.diff_b", "comfy", "diffusion_model.a", "diff_b"),
    ("input_blocks.1.1.norm.w_norm", "comfy-bare", "input_blocks.1.1.norm", "w_norm"),
    ("text_encoders.clip_l.x.set_weight", "comfy", "text_encoders.clip_l.x", "set_weight"),
    ("lora_unet_a.lora_mid.weight", "kohya", "lora_unet_a", "mid"),
])
def test_kind_suffixes_are_factor_parts(key, layout, module, part):
    found = split_key(key)
    assert (found[0].name, found[1], found[2]) == (layout, module, part)


def test_low_rank_factors_with_a_bias_diff_stay_low_rank():
    tensors = {"m.lora_up.weight": randn(4, 2), "m.lora_down.weight": randn(2, 3), "m.alpha": torch.tensor(1.0),
               "m.diff_b": randn(4), "n.diff": randn(4), "n.diff_b": randn(4)}
    adapter = adapter_from_tensors(tensors, {})
    assert set(adapter.modules) == {"m"} and adapter.modules["m"].scale == 0.5
    assert adapter.module_tensors["m"].kinds == ("bias diff",) and not adapter.module_tensors["m"].changes_weight
    assert adapter.module_tensors["n"].kinds == ("weight diff", "bias diff")
    assert adapter.kinds == {"lora": 1, "bias diff": 2, "weight diff": 1} and adapter.module_names == ["m", "n"]
    assert adapter.subset(["m"]).module_tensors.keys() == {"m"}
    written = tensors_from_module_tensors(adapter.module_tensors, {"m": "m", "n": "n"})
    assert set(written) == {"m.diff_b", "n.diff", "n.diff_b"}


def test_other_kinds_are_kept_whole_in_comfyui_spelling():
    tensors = {"unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": randn(4, 2),
               "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": randn(2, 3),
               "unet.down_blocks.0.attentions.0.proj_in.dora_scale": randn(4, 1),
               "lora_unet_x.hada_w1_a": randn(4, 2), "lora_unet_x.hada_w1_b": randn(2, 3),
               "lora_unet_x.hada_w2_a": randn(4, 2), "lora_unet_x.hada_w2_b": randn(2, 3), "lora_unet_x.alpha": torch.tensor(2.0),
               "lora_unet_o.oft_blocks": randn(2, 2, 2), "lora_unet_b.oft_blocks": randn(2, 2, 2, 2)}
    adapter = adapter_from_tensors(tensors, {})
    assert adapter.modules == {}
    dora = adapter.module_tensors["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert dora.kinds == ("lora", "dora") and set(dora.tensors) == {"lora_up.weight", "lora_down.weight", "dora_scale"}
    assert adapter.module_tensors["lora_unet_x"].kinds == ("loha",) and "alpha" in adapter.module_tensors["lora_unet_x"].tensors
    assert adapter.module_tensors["lora_unet_o"].kinds == ("oft",) and adapter.module_tensors["lora_unet_b"].kinds == ("boft",)
    assert adapter.parameter_count == 4 * 2 + 2 * 3 + 4 + 2 * (4 * 2 + 2 * 3) + 8 + 16


@pytest.mark.parametrize("tensors, message", [
    ({"m.hada_w1_a": randn(4, 2), "m.hada_w1_b": randn(2, 3), "m.alpha": torch.tensor(1.0)},
     r"module 'm': hada_w1_a needs hada_w2_a, hada_w2_b beside it"),
    ({"m.lokr_w1": randn(2, 2)}, r"module 'm': LoKr needs lokr_w2 or lokr_w2_a"),
    ({"m.oft_blocks": randn(2, 2)}, r"oft_blocks must be 3-D \(OFT\) or 4-D \(BOFT\), got \(2, 2\)"),
    ({"m.lora_up.weight": randn(4, 2), "m.lora_down.weight": randn(2, 3), "m.diff": randn(4, 3)},
     r"module 'm' mixes lora and weight diff"),
    ({"m.dora_scale": randn(4, 1), "m.diff": randn(4, 3)}, r"dora_scale without factors it could rescale"),
    ({"m.lora_up.weight": randn(4, 0), "m.lora_down.weight": randn(0, 3)}, r"empty factors .* rank 0"),
    ({"m.lora_up.weight": randn(4, 0), "m.lora_down.weight": randn(0, 3), "m.lora_mid.weight": randn(0, 0, 3, 3)},
     r"lora_down.weight, lora_mid.weight, lora_up.weight are empty \(rank 0\)"),
    ({"m.b_norm": randn(4)}, r"b_norm needs w_norm beside it"),
])
def test_modules_comfyui_would_fail_on_or_skip_are_refused(tensors, message):
    with pytest.raises(ValueError, match=f"file.safetensors: .*{message}"):
        adapter_from_tensors(tensors, {}, source="file.safetensors")


def test_keys_not_used_are_kept_with_the_reason():
    adapter = adapter_from_tensors({"m.diff": randn(4), "m.alpha": torch.tensor(3.0), "m.lora_magnitude_vector": randn(4),
                                    "stray": randn(1)}, {})
    assert adapter.ignored_keys == {"m.alpha": "refused: an alpha with no factors to scale",
                                    "m.lora_magnitude_vector": "unknown kind", "stray": "unknown kind"}
    assert set(adapter.module_tensors["m"].tensors) == {"diff"}


def test_binding_checks_kept_tensors_against_weights_and_biases():
    tensors = {"a.hada_w1_a": randn(4, 2), "a.hada_w1_b": randn(2, 3), "a.hada_w2_a": randn(4, 2),
               "a.hada_w2_b": randn(2, 3), "a.diff_b": randn(4), "n.w_norm": randn(4), "n.b_norm": randn(4),
               "gone.diff": randn(4)}
    adapter = adapter_from_tensors(tensors, {}, source="x")
    key_map = {"a": "m.a.weight", "n": "m.n.weight"}
    shapes = {"m.a.weight": (4, 3), "m.a.bias": (4,), "m.n.weight": (4,), "m.n.bias": (4,)}
    binding = bind(adapter, key_map, shapes)
    assert set(binding.tensor_targets) == {"m.a.weight", "m.n.weight"} and binding.unmatched == ["gone"]
    assert binding.matched_count == 2 and binding.kinds == {"loha": 1, "bias diff": 1, "norm diff": 1}
    with pytest.raises(ValueError, match=r"x: module 'a' does not fit m.a.weight: its loha tensors"):
        bind(adapter, key_map, {**shapes, "m.a.weight": (4, 5)})
    with pytest.raises(ValueError, match=r"x: module 'a' changes a bias, but m.a has none in this model"):
        bind(adapter, key_map, {k: v for k, v in shapes.items() if k != "m.a.bias"})
    with pytest.raises(ValueError, match=r"x: module 'n' does not fit m.n.bias: b_norm is \(4,\), the model's bias is"):
        bind(adapter, key_map, {**shapes, "m.n.bias": (5,)})
    both = adapter_from_tensors({"a.diff": randn(4, 3), "lora_unet_a.diff": randn(4, 3)}, {}, source="y")
    with pytest.raises(ValueError, match="y: modules 'a' and 'lora_unet_a' both patch m.a.weight"):
        bind(both, {"a": "m.a.weight", "lora_unet_a": "m.a.weight"}, shapes)


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_exact_lowrank_finds_the_rank_and_keeps_full_rank_changes_whole(kernel):
    delta = (randn(40, 3, seed=1) @ randn(3, 45, seed=2)).reshape(40, 45 // 9 if kernel else 45, *kernel)
    form = exact_lowrank(delta)
    assert form.factors.rank == 3 and form.relative_error < 1e-7 and form.factors.delta_shape == tuple(delta.shape)
    assert "loha as ΔW of rank 3 of 40, relative error" in form.describe(("loha",))
    full = exact_lowrank(randn(40, 30, seed=3))
    assert full.factors.rank == 30 and full.relative_error < 1e-7 and "kept whole" in full.describe(("lokr",))
    assert exact_lowrank(torch.zeros(5, 4)).factors.rank == 1


def test_vector_changes_are_summed_and_carried_as_diffs():
    summed = sum_diffs({"m.a.bias": [(torch.ones(4), 0.5), (torch.ones(4), 1.5)], "m.n.weight": [(torch.ones(2), 2.0)]})
    assert torch.equal(summed["m.a.bias"], torch.full((4,), 2.0))
    carried = carried_diffs({**summed, "m.n.bias": torch.zeros(2)})
    assert set(carried) == {"m.a.weight", "m.n.weight"}
    assert carried["m.a.weight"].kinds == ("bias diff",) and set(carried["m.n.weight"].tensors) == {"diff", "diff_b"}


def test_two_dimensional_conv_factors_take_the_kernel_layout():
    factors = LowRank(up=randn(6, 2), down=randn(2, 5 * 9), alpha=4.0)
    shaped = factors.shaped_like((6, 5, 3, 3))
    assert shaped.up.shape == (6, 2, 1, 1) and shaped.down.shape == (2, 5, 3, 3) and shaped.scale == 2.0
    assert torch.equal(shaped.delta(torch.float64).flatten(1), factors.delta(torch.float64))
    assert factors.shaped_like((6, 45)) is factors
