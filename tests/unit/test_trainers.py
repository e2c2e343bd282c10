"""core.trainers and core.training_data: targets, QR-LoRA's trainable form, recipes, state files, images, captions."""
import pytest
import torch

from core.qr_lora import upper_triangular_mask
from core.trainers import (BLOCK_SPLITS, METHOD_OPTIONS, consislora_phases, parse_blocks, select_targets,
                           state_file_contents, state_from_file, trainable_lora, trainable_qr, trainable_parameters,
                           weights_hash)
from core.training import Phase, TrainState, optimise, Optimiser
from core.training_data import fill_trigger, resize_and_crop, split_captions, training_images

SHAPES = {
    "diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "diffusion_model.input_blocks.1.1.proj_out.weight": (320, 320, 1, 1),
    "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_out.0.weight": (320, 320),
    "diffusion_model.output_blocks.0.0.in_layers.2.weight": (320, 320, 3, 3),
    "diffusion_model.time_embed.0.weight": (1280, 320),
    "diffusion_model.out.2.bias": (4,),
    "text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
}


def test_target_presets_pick_the_documented_layers():
    attention = select_targets(SHAPES, "attention projections")
    assert sorted(attention) == sorted(k for k in SHAPES if ".attn" in k)
    assert list(select_targets(SHAPES, "proj_out")) == ["diffusion_model.input_blocks.1.1.proj_out.weight"]
    linear = select_targets(SHAPES, "all linear")
    assert "diffusion_model.output_blocks.0.0.in_layers.2.weight" not in linear and len(linear) == 6
    blocks = select_targets(SHAPES, "attention in blocks", ("output_blocks.0.1",))
    assert list(blocks) == ["diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_out.0.weight"]
    with pytest.raises(ValueError, match=r"blocks \['output_blocks.9.1'\] hold no 'attention in blocks' layer"):
        select_targets(SHAPES, "attention in blocks", ("output_blocks.9.1",))
    with pytest.raises(ValueError, match="needs a block list"):
        select_targets(SHAPES, "attention in blocks")
    with pytest.raises(ValueError, match="targets must be one of"):
        select_targets(SHAPES, "everything")
    assert parse_blocks(" output_blocks.0.1,\noutput_blocks.1.1 ,") == ("output_blocks.0.1", "output_blocks.1.1")
    assert BLOCK_SPLITS["SDXL"] == (("output_blocks.0.1",), ("output_blocks.1.1",))


def test_trainable_lora_starts_at_zero_change_with_gradients():
    factors = trainable_lora((320, 320, 1, 1), 4, 8.0, torch.Generator().manual_seed(0))
    assert factors.up.shape == (320, 4, 1, 1) and factors.down.shape == (4, 320, 1, 1) and factors.scale == 2.0
    assert factors.up.requires_grad and factors.down.requires_grad and not factors.up.abs().sum()
    assert trainable_lora((3, 5), 8, 8.0, torch.Generator().manual_seed(0)).rank == 3
    assert set(trainable_parameters({"m": factors})) == {"m.up", "m.down"}


@pytest.mark.parametrize("shape", [(48, 40), (40, 48, 1, 1)])
def test_qr_lora_trainable_form(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    factors, mask = trainable_qr(weight, 8)
    q, r, delta = factors.up.flatten(1), factors.extras["base_r"].flatten(1), factors.down
    residual = weight.flatten(1) - q @ r  # what stays in the model
    assert torch.allclose(residual + q @ r, weight.flatten(1), atol=1e-6)
    assert torch.allclose(q.T @ q, torch.eye(8), atol=1e-5)
    assert torch.equal(mask.flatten(1), upper_triangular_mask(8, weight[0].numel()))
    assert not factors.up.requires_grad and delta.requires_grad and not delta.abs().sum()
    q_before, r_before = factors.up.clone(), factors.extras["base_r"].clone()
    target = torch.randn(delta.shape, generator=torch.Generator().manual_seed(2))
    optimise({"d": delta}, lambda s, m: ((delta - target) ** 2).sum(), 5, lambda s: 0.1, Optimiser(),
             grad_masks={"d": mask})
    assert torch.equal(factors.up, q_before) and torch.equal(factors.extras["base_r"], r_before)
    assert torch.equal(delta.detach() * (1 - mask), torch.zeros_like(delta)) and delta.detach().abs().sum() > 0


def test_consislora_phases():
    assert consislora_phases("content", 1500, 500, 2e-4, 1e-4) == (Phase(500, "epsilon", 2e-4), Phase(1500, "x0", 1e-4))
    assert consislora_phases("b-lora", 1000, 500, 5e-5, 1e-4) == (Phase(1000, "epsilon", 5e-5),)
    assert consislora_phases("style", 100, 0, 2e-4, 1e-4) == (Phase(100, "x0", 1e-4),)
    options = METHOD_OPTIONS["consislora"]
    assert options.weight_decay == 1e-4 and options.grad_clip == 1.0 and METHOD_OPTIONS["qr-lora"].accumulation == 4
    recipe = options.recipe(consislora_phases("content", 10, 4, 2e-4, 1e-4), seed=3, noise_offset=0.03)
    assert recipe.steps == 10 and recipe.noise_offset == 0.03 and recipe.phase_at(4).target == "x0"


def test_training_state_file_round_trip_and_refusal():
    weight = torch.zeros(3, requires_grad=True)
    state = optimise({"a.down": weight}, lambda s, m: ((weight - 1) ** 2).sum(), 2, lambda s: 0.1, Optimiser())
    tensors, metadata = state_file_contents(state, ["a.down"], {"method": "lora"})
    restored, recipe = state_from_file(tensors, metadata, "x", ["a.down"])
    assert restored.step == 2 and restored.losses == state.losses and recipe == {"method": "lora"}
    assert torch.equal(restored.optimiser["state"][0]["exp_avg"], state.optimiser["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="for other parameters"):
        state_from_file(tensors, metadata, "x", ["b.down"])
    with pytest.raises(ValueError, match="not a training-state file"):
        state_from_file(tensors, {}, "x", ["a.down"])
    assert isinstance(TrainState().losses, list)


def test_weights_hash_depends_on_values_and_names():
    a = {"k": torch.ones(2, 2)}
    assert weights_hash(a) == weights_hash({"k": torch.ones(2, 2, dtype=torch.float16)})
    assert weights_hash(a) != weights_hash({"k": torch.ones(2, 2) * 2}) != weights_hash({"j": torch.ones(2, 2)})


def test_images_are_resized_and_centre_cropped():
    image = torch.zeros(40, 80, 3)
    image[:, 20:60] = 1.0  # a bright centre band, as wide as the crop
    cropped = resize_and_crop(image, 20)
    assert cropped.shape == (20, 20, 3) and cropped.mean() > 0.95
    assert resize_and_crop(torch.rand(64, 64, 4), 64).shape == (64, 64, 3)


def test_captions_and_trigger_word():
    assert split_captions("a {trigger} dog", 3) == ["a {trigger} dog"] * 3
    assert split_captions("a\n\nb\nc\n", 3) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="2 caption lines for 3 images"):
        split_captions("a\nb", 3)
    assert fill_trigger("a {trigger} dog", " sks ") == "a sks dog"
    with pytest.raises(ValueError, match="no trigger word is set"):
        fill_trigger("a {trigger} dog", "")
    data = training_images([torch.rand(1, 32, 48, 3), torch.rand(50, 50, 3)], ["x {trigger}", "y"], 16, 2, "sks")
    assert data.images.shape == (2, 16, 16, 3) and data.captions == ("x sks", "y") and data.repeats == 2
    assert data.describe()["captions"] == ["x sks", "y"]
    with pytest.raises(ValueError, match="no training images"):
        training_images([], [], 16)


def test_b_lora_parts_follow_the_split_a_file_records():
    import json

    from core.adapter import Adapter, LowRank
    from core.blocks import BLOCK_SPLIT_KEY, select_b_lora_part

    factors = LowRank(up=torch.zeros(4, 1), down=torch.zeros(1, 4))
    names = ["diffusion_model.middle_block.1.proj_in", "diffusion_model.output_blocks.0.1.proj_in",
             "diffusion_model.output_blocks.1.1.proj_in"]
    plain = Adapter(modules={n: factors for n in names})
    assert list(select_b_lora_part(plain, "content").modules) == [names[1]]
    split = {BLOCK_SPLIT_KEY: json.dumps({"content": ["middle_block.1"], "style": ["output_blocks.0.1"]})}
    trained = plain.replace(metadata=split)
    assert list(select_b_lora_part(trained, "content").modules) == [names[0]]
    assert list(select_b_lora_part(trained, "style").modules) == [names[1]]


def test_token_rows_change_adds_each_trained_row_to_its_token_and_nothing_else():
    from core.trainers import trainable_token_rows

    factors, mask = trainable_token_rows((7, 2), vocab=10, width=3)
    assert factors.down.requires_grad and not factors.up.requires_grad and torch.equal(mask, torch.zeros(10, 2))
    assert torch.equal(factors.delta(), torch.zeros(10, 3))  # a fresh change is zero
    with torch.no_grad():
        factors.down.copy_(torch.tensor([[1.0, 2.0, 3.0], [-4.0, 5.0, 0.5]]))
    dense = torch.zeros(10, 3, dtype=torch.float64)
    dense[7], dense[2] = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-4.0, 5.0, 0.5])
    assert torch.equal(factors.delta(torch.float64), dense) and factors.scale == 1.0
    for ids in ((), (3, 3), (10,)):
        with pytest.raises(ValueError, match="distinct and within the vocabulary of 10"):
            trainable_token_rows(ids, vocab=10, width=3)
