"""Train ZipLoRA on the tiny SD1.5 model (ComfyUI in-process): the saved file is the folded merge of its merger
vectors, applies in stock LoraLoader exactly as Apply Adapters applies the node's adapter, resumes bit for bit, and
refuses to resume another run's file."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from support.lora_files import build_file
from support.weights import patched_weights

pytestmark = pytest.mark.host

SIZE = 64
ATTENTION = [f"input_blocks.1.1.transformer_blocks.0.{attn}.{proj}" for attn in ("attn1", "attn2")
             for proj in ("to_q", "to_k", "to_out.0")]
CONV_3X3 = "output_blocks.0.0.in_layers.2"
VALUES = "csa.values."


@pytest.fixture(scope="module")
def files(comfy_base, tiny_sd15):
    shapes = {k: tuple(v.shape) for k, v in tiny_sd15[0].model.state_dict().items()}
    made = {}
    for role, rank, seed, modules in (("content", 2, 21, ATTENTION + [CONV_3X3]), ("style", 3, 22, ATTENTION[:4])):
        tensors, deltas = build_file(shapes, modules, "kohya", rank=rank, alpha=float(rank) / 2, seed=seed)
        name = f"csa_zip_{role}.safetensors"
        save_file({k: v * 0.2 if k.endswith("lora_up.weight") else v for k, v in tensors.items()},
                  str(comfy_base / "models" / "loras" / name))
        made[role] = (name, {k: d * 0.2 for k, d in deltas.items()})
    return made


def images(comfy, colour, caption):
    generator = torch.Generator().manual_seed(len(caption))
    pictures = torch.rand(2, SIZE, SIZE, 3, generator=generator) * 0.3
    pictures[:, 16:48, 16:48] = torch.tensor(colour)
    return comfy["CSA_TrainingImages"].execute(images=pictures, captions=caption, image_folder="", repeats=1,
                                               trigger_word="", resolution=SIZE).args[0]


def options(comfy, **changes):
    values = {"batch_size": 1, "accumulation": 1, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
              "grad_clip": 0.0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "save_every": 0, "preview_prompt": "",
              "preview_every": 0, "preview_seed": 0, "precision": "fp32", **changes}
    return comfy["CSA_TrainingOptions"].execute(**values).args[0]


def load(comfy, name, strength):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part="whole file",
                                            role="from file").args[0]


def train(comfy, tiny_sd15, files, steps, filename, resume_from="none", opts=None, lr=0.05):
    model, clip, vae = tiny_sd15
    return comfy["CSA_TrainZipLoRA"].execute(
        model=model, clip=clip, vae=vae, content=load(comfy, files["content"][0], 0.8),
        style=load(comfy, files["style"][0], 1.2), content_data=images(comfy, [0.9, 0.2, 0.1], "a sks square"),
        style_data=images(comfy, [0.1, 0.3, 0.9], "a square in zkz style"), steps=steps, lr=lr,
        similarity_weight=0.01, penalty="mean |m_c ⊙ m_s| (common implementation)", loss="epsilon", seed=3,
        filename=filename, overwrite=True, resume_from=resume_from, options=opts).args


def test_the_saved_file_is_the_folded_merge_and_loads_in_stock_lora_loader(comfy, comfy_base, tiny_sd15, files):
    model, clip, _ = tiny_sd15
    adapter, report, curve, previews, path = train(comfy, tiny_sd15, files, 3, "csa_zip_merged.safetensors",
                                                   opts=options(comfy, preview_prompt="a sks square in zkz style"))
    assert curve.ndim == 4 and previews.shape == (1, SIZE, SIZE, 3)
    assert "merger vectors on 6 layers (4 changed by both adapters)" in report and "1 kxk conv layers" in report
    with safe_open(path, "pt") as handle:
        assert handle.metadata()["csa.method"] == "ziplora"
    state = load_file(path.replace(".safetensors", ".optimizer-state"))
    (_, content), (_, style) = files["content"], files["style"]
    expected = {}
    for native in ATTENTION:
        key = f"diffusion_model.{native}.weight"
        change = torch.zeros_like(content[key])
        for deltas, strength, part in ((content, 0.8, "m_content"), (style, 1.2, "m_style")):
            if key in deltas:
                vector = state[f"{VALUES}{key}.{part}"].double()
                assert not torch.equal(vector, torch.ones_like(vector)), "three steps moved the vector"
                change += strength * deltas[key] * vector[None, :]
        expected[key] = change
    expected[f"diffusion_model.{CONV_3X3}.weight"] = 0.8 * content[f"diffusion_model.{CONV_3X3}.weight"]

    stock = comfy["LoraLoader"]().load_lora(model, clip, "csa_zip_merged.safetensors", 1.0, 0.0)[0]
    ours = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args[0]
    assert set(stock.patches) == set(ours.patches) == set(expected)
    base = {k: v.double() for k, v in patched_weights(model.clone(), expected).items()}
    theirs, mine = patched_weights(stock, expected), patched_weights(ours, expected)
    for key, change in expected.items():
        scale = change.abs().max()
        assert (theirs[key].double() - base[key] - change).abs().max() <= 1e-5 * scale, key
        assert (mine[key].double() - base[key] - change).abs().max() <= 1e-5 * scale, key


def test_a_cut_run_resumed_equals_one_run(comfy, tiny_sd15, files):
    whole = train(comfy, tiny_sd15, files, 4, "csa_zip_whole.safetensors")
    train(comfy, tiny_sd15, files, 2, "csa_zip_cut.safetensors")
    resumed = train(comfy, tiny_sd15, files, 4, "csa_zip_resumed.safetensors", resume_from="csa_zip_cut.safetensors")
    a, b = load_file(whole[4]), load_file(resumed[4])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="resume_from 'csa_zip_cut.safetensors' merged other adapters"):
        model, clip, vae = tiny_sd15
        comfy["CSA_TrainZipLoRA"].execute(
            model=model, clip=clip, vae=vae, content=load(comfy, files["content"][0], 0.5),
            style=load(comfy, files["style"][0], 1.2), content_data=images(comfy, [0.9, 0.2, 0.1], "a sks square"),
            style_data=images(comfy, [0.1, 0.3, 0.9], "a square in zkz style"), steps=4, lr=0.05,
            similarity_weight=0.01, penalty="mean |m_c ⊙ m_s| (common implementation)", loss="epsilon", seed=3,
            filename="", overwrite=True, resume_from="csa_zip_cut.safetensors", options=None)
