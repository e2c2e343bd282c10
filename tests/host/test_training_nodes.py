"""The trainers on the tiny SD1.5 model (ComfyUI in-process): loss, frozen base, saves, resume, cancel, QR-LoRA,
ConsisLoRA stages, training images from a folder."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support.weights import checkpoint_weights

pytestmark = pytest.mark.host

SIZE = 64


@pytest.fixture(scope="module")
def training(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.training")


@pytest.fixture(scope="module")
def data(comfy):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, SIZE, SIZE, 3, generator=generator) * 0.3
    images[:, 16:48, 16:48] = torch.tensor([0.9, 0.2, 0.1])  # a red square on a dark field
    return images_node(comfy, images=images, captions="a {trigger} square\na {trigger} block", trigger_word="sks")


def images_node(comfy, **inputs):
    inputs = {"captions": "a {trigger}", "image_folder": "", "repeats": 1, "trigger_word": "", "resolution": SIZE,
              **inputs}
    return comfy["CSA_TrainingImages"].execute(**inputs).args[0]


def options(comfy, **changes):
    values = {"batch_size": 2, "accumulation": 1, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
              "grad_clip": 0.0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "save_every": 0, "preview_prompt": "",
              "preview_every": 0, "preview_seed": 0, "precision": "fp32", **changes}
    return comfy["CSA_TrainingOptions"].execute(**values).args[0]


def train_lora(comfy, tiny_sd15, data, steps=4, filename="", overwrite=True, resume_from="none", opts=None, **extra):
    model, clip, vae = tiny_sd15
    inputs = {"targets": "attention projections", "blocks": "", "rank": 4, "alpha": 4.0, "lr": 1e-2, "loss": "x0",
              "role": "content", "seed": 0, **extra}
    return comfy["CSA_TrainAdapter"].execute(model=model, clip=clip, vae=vae, data=data, steps=steps, filename=filename,
                                             overwrite=overwrite, resume_from=resume_from, options=opts, **inputs).args


def state_of(comfy_base, stem):
    with safe_open(str(comfy_base / "models" / "loras" / f"{stem}.optimizer-state"), "pt") as handle:
        return handle.metadata()


def fixed_x0_loss(training, tiny_sd15, adapter, data_value):
    """x0 loss of the model (with the adapter at run time) at fixed noise and noise levels."""
    import comfy.model_management as mm

    model, clip, vae = tiny_sd15
    generator = torch.Generator().manual_seed(11)
    trainee = training.Trainee(model, adapter.modules)
    try:
        with torch.no_grad():
            latents, conds = training.encode_training_set(model, vae, clip, data_value)
            sigma = torch.tensor([0.5, 2.0])
            noise = torch.randn(latents.shape, generator=generator)
            x0_hat = trainee.predict(latents + sigma.view(-1, 1, 1, 1) * noise, sigma, conds)
            return float(((x0_hat - latents) ** 2).mean())
    finally:
        mm.unload_all_models()



def test_lora_lowers_the_loss_leaves_the_base_bit_identical_and_trains_only_the_adapter(comfy, tiny_sd15, data,
                                                                                         training):
    import comfy.model_management as mm

    model, clip, vae = tiny_sd15
    mm.unload_all_models()
    unet_keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
    adapter, curve, previews, path = train_lora(comfy, tiny_sd15, data, steps=12, opts=options(comfy),
                                                targets="all linear")
    after = model.model.state_dict()
    file = checkpoint_weights(unet_keys)
    assert all(torch.equal(after[k].to(file[k].dtype), file[k]) for k in unet_keys), "a base weight changed"
    assert all(p.grad is None and not p.requires_grad for p in model.model.parameters()), "a base weight had a gradient"
    assert adapter.method == "lora" and adapter.role == "content" and path == ""
    assert "diffusion_model.input_blocks.1.1.proj_in" in adapter.modules and len(adapter.modules) > 32
    assert all(not f.up.requires_grad and f.up.abs().sum() > 0 for f in adapter.modules.values())
    assert curve.shape == (1, 256, 512, 3) and previews.shape == (1, SIZE, SIZE, 3)
    untrained = training.Adapter(modules={n: training.LowRank(up=torch.zeros_like(f.up), down=f.down, alpha=f.alpha)
                                          for n, f in adapter.modules.items()})
    assert fixed_x0_loss(training, tiny_sd15, adapter, data) < 0.9 * fixed_x0_loss(training, tiny_sd15, untrained, data)


def test_saved_adapter_reloads_reproduces_the_prediction_and_records_the_recipe(comfy, comfy_base, tiny_sd15, data,
                                                                                training):
    import comfy.model_management as mm

    model, _, vae = tiny_sd15
    adapter, _, _, path = train_lora(comfy, tiny_sd15, data, filename="host_trained_lora", opts=options(comfy))
    assert path.endswith("host_trained_lora.safetensors")
    loaded = comfy["CSA_LoadAdapter"].execute(adapter_name="host_trained_lora.safetensors", strength=1.0,
                                              part="whole file", role="from file").args[0]
    recipe = json.loads(loaded.metadata["csa.created_with"])
    assert loaded.method == "lora" and loaded.role == "content" and recipe["settings"]["lr"] == 1e-2
    assert recipe["settings"]["seed"] == 0 and recipe["stages"][0]["phases"] == [{"until": 4, "target": "x0", "lr": 0.01}]
    assert recipe["data"]["captions"] == ["a sks block", "a sks square"] and len(loaded.metadata["csa.base_hash"]) == 16
    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1.5])
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4))
    patched = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=loaded, block_strengths="").args[0]
    try:
        with torch.no_grad():
            trained = training.Trainee(model, adapter.modules)
            expected = training.cc.denoised(trained.model, x, sigma, cond, {})
            training.cc.load_for_direct_calls(patched)
            reloaded = training.cc.denoised(patched, x, sigma, cond, {})
    finally:
        mm.unload_all_models()
    assert torch.allclose(reloaded, expected, atol=1e-4) and (expected - x).abs().max() > 0
    with pytest.raises(FileExistsError, match="host_trained_lora.safetensors already exists"):
        train_lora(comfy, tiny_sd15, data, filename="host_trained_lora", overwrite=False)


def test_cancel_leaves_no_file(comfy, comfy_base, tiny_sd15, data):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train_lora(comfy, tiny_sd15, data, filename="host_cancelled_lora")
    finally:
        mm.interrupt_current_processing(False)
    assert not list((comfy_base / "models" / "loras").glob("host_cancelled_lora*"))


def test_resume_continues_the_loss_curve_where_it_stopped(comfy, comfy_base, tiny_sd15, data):
    opts = options(comfy, save_every=2, schedule="cosine", min_snr_gamma=5.0)
    straight = train_lora(comfy, tiny_sd15, data, steps=4, filename="host_straight", opts=opts)[0]
    assert (comfy_base / "models" / "loras" / "host_straight_step000002.safetensors").is_file()
    resumed = train_lora(comfy, tiny_sd15, data, steps=4, filename="host_resumed", opts=options(comfy, schedule="cosine",
                         min_snr_gamma=5.0), resume_from="host_straight_step000002.safetensors")[0]
    whole, continued = state_of(comfy_base, "host_straight"), state_of(comfy_base, "host_resumed")
    assert json.loads(continued["csa.losses"]) == pytest.approx(json.loads(whole["csa.losses"]), abs=1e-6)
    assert continued["csa.step"] == "4"
    for name, factors in straight.modules.items():
        assert torch.allclose(resumed.modules[name].up, factors.up, atol=1e-6)
    with pytest.raises(ValueError, match="trains 32 modules, this node targets 8"):
        train_lora(comfy, tiny_sd15, data, resume_from="host_straight.safetensors", targets="attention in blocks",
                   blocks="output_blocks.1.1")


def test_qr_lora_keeps_q_and_r_and_merges_exactly(comfy, comfy_base, tiny_sd15, data):
    from core.qr_lora import qr_factorise

    model, clip, vae = tiny_sd15
    inputs = {"targets": "attention in blocks", "blocks": "input_blocks.1.1", "rank": 8, "steps": 3, "lr": 1e-2,
              "loss": "epsilon", "seed": 0, "overwrite": True, "resume_from": "none", "options": options(comfy)}
    run = comfy["CSA_TrainQRLoRA"]
    content = run.execute(model=model, clip=clip, vae=vae, data=data, role="content", filename="host_qr", **inputs).args
    style = run.execute(model=model, clip=clip, vae=vae, data=images_node(comfy, images=torch.rand(2, SIZE, SIZE, 3), captions="a thing"),
                        role="style", filename="", **inputs).args[0]
    base = checkpoint_weights([name + ".weight" for name in content[0].modules])
    for name, factors in content[0].modules.items():
        reference = qr_factorise(base[name + ".weight"].float(), 8)
        assert torch.equal(factors.up.flatten(1), reference.q) and torch.equal(factors.extras["base_r"].flatten(1), reference.r)
        assert torch.equal(factors.down, torch.triu(factors.down)) and factors.down.abs().sum() > 0
        assert torch.allclose(reference.residual + reference.q @ reference.r, base[name + ".weight"].float().flatten(1),
                              atol=1e-6)
    loaded = comfy["CSA_LoadAdapter"].execute(adapter_name="host_qr.safetensors", strength=1.0, part="whole file",
                                              role="from file").args[0]
    assert loaded.method == "qr-lora" and all("base_r" in f.extras for f in loaded.modules.values())
    patched, merged, report = comfy["CSA_QRMerge"].execute(model=model, content=loaded, style=style, lambda_content=1.0,
                                                           lambda_style=0.5, interference="off").args
    assert report.splitlines()[0] == "8 layers: 8 shared-q" and merged.ranks == [8]
    for name, factors in merged.modules.items():
        expected = loaded.modules[name].up.flatten(1) @ (loaded.modules[name].down + 0.5 * style.modules[name].down).flatten(1)
        assert torch.allclose(factors.delta().flatten(1), expected, atol=1e-6)


def test_consislora_style_mode_freezes_the_content_block_in_stage_two(comfy, comfy_base, tiny_sd15, data):
    model, clip, vae = tiny_sd15
    outputs = comfy["CSA_TrainConsisLoRA"].execute(
        model=model, clip=clip, vae=vae, data=data, mode="style", block_split="auto", content_blocks="", style_blocks="",
        rank=4, alpha=4.0, steps=3, switch_step=1, lr_epsilon=1e-2, lr_x0=1e-2, style_steps=2, style_lr=1e-2,
        style_noise_offset=0.03, seed=0, filename="host_consis_style", overwrite=True, resume_from="none",
        options=options(comfy, save_every=3)).args
    adapter, content_block, style_block = outputs[:3]
    content_blocks, style_blocks = (".input_blocks.1.1.", ".middle_block.1."), (".output_blocks.0.1.", ".output_blocks.1.1.")
    assert adapter.method == "consislora" and adapter.role == "style" and len(adapter.modules) == 32
    assert content_block.role == "content" and len(content_block.modules) == 16
    assert all(any(b in n for b in content_blocks) for n in content_block.modules)
    assert style_block.role == "style" and len(style_block.modules) == 16
    assert all(any(b in n for b in style_blocks) for n in style_block.modules)
    stage_one = comfy["CSA_LoadAdapter"].execute(adapter_name="host_consis_style_step000003.safetensors", strength=1.0,
                                                 part="whole file", role="from file").args[0]
    for name, factors in adapter.modules.items():
        same = torch.equal(factors.down, stage_one.modules[name].down)
        assert same == (name in content_block.modules), name
    split = {"content": ["input_blocks.1.1", "middle_block.1"],  # auto: the world layout's measured split
             "style": ["output_blocks.0.1", "output_blocks.1.1"]}
    assert json.loads(stage_one.metadata["csa.block_split"]) == split
    composed = comfy["CSA_ComposeContentAndStyle"].execute(model=model, content_image_adapter=stage_one,
                                                           style_image_adapter=adapter).args[0]
    assert len(composed.patches) == 32
    recipe = json.loads(state_of(comfy_base, "host_consis_style")["csa.recipe"])
    assert [s["noise_offset"] for s in recipe["stages"]] == [0.0, 0.03]
    assert [p["target"] for p in recipe["stages"][0]["phases"]] == ["epsilon", "x0"]


def test_training_images_from_a_folder_with_captions_and_repeats(comfy, comfy_base):
    from PIL import Image

    folder = comfy_base / "input" / "host_training_folder"
    folder.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(((40, 30), (64, 64))):
        Image.new("RGB", size, (200, 20 * index, 10)).save(folder / f"{index}.png")
    (folder / "0.txt").write_text("a {trigger} brick\n")
    data = images_node(comfy, image_folder="host_training_folder", captions="a plain {trigger}", repeats=3,
                       trigger_word="zkz", resolution=32)
    assert data.images.shape == (2, 32, 32, 3) and data.captions == ("a zkz brick", "a plain zkz") and data.repeats == 3
    with pytest.raises(ValueError, match="is not a folder inside ComfyUI's input directory"):
        images_node(comfy, image_folder="../models")
