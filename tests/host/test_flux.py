"""Adapters on FLUX (a real FLUX to ComfyUI: the tiny one the test set-up builds, loaded by UNETLoader's loader) and on
SD3: every tensor stock LoraLoaderModelOnly changes, changed exactly alike by Apply Adapters, QR Merge and Save Adapter,
for diffusers files (slices of the fused qkv / linear1 weights) and kohya files (whole fused weights)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from support.flux_loras import DIFFUSERS_FLUX_MODULES, FUSED_SLICES, KOHYA_FLUX_MODULES, flux_lora
from support.weights import patched_weights

pytestmark = pytest.mark.host

FLOAT32_PRECISION = 1e-6  # of a layer's largest weight change: a few float32 ulps


@pytest.fixture(scope="module")
def loras(comfy_base):
    folder = comfy_base / "models" / "loras"
    files = {"diffusers": "csa_flux_diffusers.safetensors", "kohya": "csa_flux_kohya.safetensors"}
    for layout, name in files.items():
        save_file(flux_lora(layout, seed=1 if layout == "kohya" else 0), str(folder / name))
    return files


def load(comfy, name, strength=1.0, role="from file"):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part="whole file", role=role).args[0]


def stock(comfy, model, name, strength=1.0):
    return comfy["LoraLoaderModelOnly"]().load_lora_model_only(model, name, strength)[0]


def max_relative_difference(ours, theirs, keys) -> float:
    """max over keys of |ours - theirs| / max |theirs - base|: per weight, against the size of the change."""
    worst, base = 0.0, unpatched(theirs)
    for key in keys:  # one weight at a time: the fused weights are up to 66M entries
        a, b, original = (patched_weights(p, [key])[key] for p in (ours, theirs, base))
        worst = max(worst, float((a - b).abs().max() / (b - original).abs().max()))
    return worst


def unpatched(patcher):
    clone = patcher.clone()
    clone.patches = {}
    return clone


def test_the_test_model_is_a_flux_to_comfyui(tiny_flux):
    assert type(tiny_flux.model.model_config).__name__ == "Flux"
    assert tiny_flux.model.model_config.unet_config["hidden_size"] == 3072


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_apply_adapters_changes_every_tensor_stock_changes_exactly(comfy, tiny_flux, loras, layout):
    adapter = load(comfy, loras[layout], strength=0.8)
    ours, _, report = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=adapter, block_strengths="").args
    theirs = stock(comfy, tiny_flux, loras[layout], 0.8)
    modules = DIFFUSERS_FLUX_MODULES if layout == "diffusers" else KOHYA_FLUX_MODULES
    assert f"{len(modules)} of {len(modules)} modules mapped onto Flux" in report and "not used" not in report
    assert set(ours.patches) == set(theirs.patches)
    if layout == "diffusers":
        assert set(FUSED_SLICES) <= set(theirs.patches), "the slices of qkv and linear1 are part of the check"
        assert all(len(theirs.patches[k]) == len(parts) for k, parts in FUSED_SLICES.items())
    assert max_relative_difference(ours, theirs, theirs.patches) < FLOAT32_PRECISION


def test_qr_merge_of_a_file_with_itself_at_half_and_half_is_stock_at_one(comfy, tiny_flux, loras):
    adapter = load(comfy, loras["diffusers"])
    merged, merged_adapter, report = comfy["CSA_QRMerge"].execute(
        model=tiny_flux, content=adapter, style=adapter, lambda_content=0.5, lambda_style=0.5, interference="off").args
    theirs = stock(comfy, tiny_flux, loras["diffusers"], 1.0)
    assert set(merged.patches) == set(theirs.patches)
    assert max_relative_difference(merged, theirs, theirs.patches) < FLOAT32_PRECISION
    fused = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert fused in merged_adapter.modules and merged_adapter.modules[fused].rank == 3 * 4, \
        "one merged LoRA on the fused weight: q, k and v side by side (the two inputs' ups are one Q)"
    assert "shared-q" in report


@pytest.mark.parametrize("key_form", ["comfy", "kohya"])
def test_a_saved_diffusers_flux_file_loads_in_stock_with_the_same_weights(comfy, comfy_base, tiny_flux, loras,
                                                                          key_form):
    adapter = load(comfy, loras["diffusers"])
    name = f"csa_flux_resaved_{key_form}"
    comfy["CSA_SaveAdapter"].execute(adapter=adapter, filename=name, subfolder="", key_form=key_form, overwrite=True,
                                     model=tiny_flux)
    resaved, original = stock(comfy, tiny_flux, name + ".safetensors"), stock(comfy, tiny_flux, loras["diffusers"])
    changed = {k if isinstance(k, str) else k[0] for k in original.patches}
    assert {k if isinstance(k, str) else k[0] for k in resaved.patches} == changed
    assert max_relative_difference(resaved, original, changed) < FLOAT32_PRECISION


def test_adapters_of_another_family_are_refused_naming_both(comfy, tiny_flux, tiny_sd15, loras):
    with pytest.raises(ValueError, match="module names are those of FLUX, the model is SD15"):
        comfy["CSA_ApplyAdapters"].execute(model=tiny_sd15[0], adapter=load(comfy, loras["diffusers"]),
                                           block_strengths="")
    with pytest.raises(ValueError, match=r"are those of a UNet model \(SD1.x / SD2.x / SDXL\), the model is Flux"):
        comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=load(comfy, "csa_demo_style.safetensors"),
                                           block_strengths="")


def test_sd3_diffusers_slices_apply_like_stock(comfy, comfy_base, tiny_sd3):
    width = 128  # depth 2: hidden 64 x 2
    modules = {f"transformer.transformer_blocks.{i}.attn.{p}": (width, width) for i in range(2)
               for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
    name = "csa_sd3_diffusers.safetensors"
    save_file(flux_lora("diffusers", rank=2, seed=3, modules=modules), str(comfy_base / "models" / "loras" / name))
    ours, _, report = comfy["CSA_ApplyAdapters"].execute(model=tiny_sd3, adapter=load(comfy, name),
                                                         block_strengths="").args
    theirs = stock(comfy, tiny_sd3, name)
    assert type(tiny_sd3.model.model_config).__name__ == "SD3" and "12 of 12 modules mapped" in report
    assert set(ours.patches) == set(theirs.patches) and len(theirs.patches) >= 2
    assert max_relative_difference(ours, theirs, theirs.patches) < FLOAT32_PRECISION


def flux_sample(model, seed=0, steps=2):
    """Two Euler steps on a 16x16 latent with FLUX conditioning given directly (no small T5 exists)."""
    import comfy.sample

    generator = torch.Generator().manual_seed(seed)
    positive = [[torch.randn(1, 8, 4096, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator),
                                                                "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=generator)
    return comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", positive, positive, latent,
                               disable_pbar=True, seed=seed)


def test_klora_on_flux_with_one_adapter_zero_is_the_other_alone(comfy, comfy_base, tiny_flux, loras):
    """K-LoRA switches the fused layers at run time (its one-zero identity on FLUX's qkv and linear1 slices)."""
    zero = {k: v.zero_() if ".lora_B." in k else v for k, v in flux_lora("diffusers", seed=5).items()}
    save_file(zero, str(comfy_base / "models" / "loras" / "csa_flux_zero.safetensors"))
    content = load(comfy, loras["diffusers"], strength=0.9)
    alone = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=content, block_strengths="").args[0]
    switched, report = comfy["CSA_KLoRA"].execute(
        model=tiny_flux, content=content, style=load(comfy, "csa_flux_zero.safetensors"),
        pattern="S* (wrapped, official default)", alpha=1.5, beta=1.275,
        balance="trimmed mean of layer ratios (official code)", other_changes="leave out (K-LoRA)").args
    # 21 modules on 14 weights (img / txt q, k, v on one qkv each, the single block's q, k, v, mlp on linear1): K-LoRA
    # switches each projection of a fused weight alone, as the official code switches diffusers' to_q / to_k / to_v
    assert report.startswith(f"K-LoRA on {len(DIFFUSERS_FLUX_MODULES)} layers"), report.splitlines()[0]
    expected, got = flux_sample(alone), flux_sample(switched)
    assert torch.isfinite(got).all() and (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert not torch.equal(expected, flux_sample(tiny_flux)), "the adapter changes the prediction"


def test_klora_on_flux_switches_each_projection_of_a_fused_weight(comfy, comfy_base, tiny_flux):
    """A content LoRA on the double block's to_q only and a style LoRA on its to_v only: both land on img_attn.qkv.
    Switched per weight, one of them would be dropped at every step; switched per projection (as the official code
    switches to_q / to_v), each projection has one adapter, which always wins there, so K-LoRA is the naive sum."""
    block = "transformer.transformer_blocks.0.attn."
    for name, projection, seed in (("csa_flux_q_only", "to_q", 11), ("csa_flux_v_only", "to_v", 12)):
        tensors = {k: v for k, v in flux_lora("diffusers", seed=seed).items() if k.startswith(block + projection + ".")}
        assert len(tensors) == 2
        save_file(tensors, str(comfy_base / "models" / "loras" / f"{name}.safetensors"))
    content, style = load(comfy, "csa_flux_q_only.safetensors"), load(comfy, "csa_flux_v_only.safetensors")
    switched, report = comfy["CSA_KLoRA"].execute(
        model=tiny_flux, content=content, style=style, pattern="S* (wrapped, official default)", alpha=1.5,
        beta=1.275, balance="trimmed mean of layer ratios (official code)", other_changes="leave out (K-LoRA)").args
    assert report.startswith("K-LoRA on 2 layers (0 changed by both adapters)"), report.splitlines()[0]
    summed = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=content, adapter_2=style,
                                                block_strengths="").args[0]
    expected, got = flux_sample(summed), flux_sample(switched)
    assert not torch.equal(expected, flux_sample(tiny_flux))
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))


def flux_training_data(comfy, count=2, seed=7):
    """Training Latents: FLUX latents (16 channels) and conditioning given directly (no small T5 exists)."""
    generator = torch.Generator().manual_seed(seed)
    latents = {"samples": torch.randn(count, 16, 16, 16, generator=generator) * 0.5}
    conditioning = [[torch.randn(1, 8, 4096, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator),
                                                                     "guidance": 3.5}] for _ in range(count)]
    return comfy["CSA_TrainingLatents"].execute(latents=latents, conditioning=conditioning, captions="a sks photo",
                                                repeats=1, trigger_word="sks").args[0]


def test_lora_training_on_flux_is_flow_matching_and_its_file_loads_in_stock(comfy, tiny_flux):
    """Train Adapter on the tiny FLUX (Training Latents, no CLIP or VAE): the engine runs on the flow path with the
    model's own shifted t, the loss is finite, and the saved file changes in stock LoraLoaderModelOnly what Apply
    Adapters changes with the node's adapter."""
    import comfy.model_management as mm

    options = comfy["CSA_TrainingOptions"].execute(
        batch_size=1, accumulation=1, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision="fp32").args[0]
    adapter, curve, _, path = comfy["CSA_TrainAdapter"].execute(
        model=tiny_flux, data=flux_training_data(comfy), targets="attention projections", blocks="", rank=2, alpha=2.0,
        steps=2, lr=1e-3, loss="v", role="content", seed=0, filename="csa_flux_trained.safetensors", overwrite=True,
        resume_from="none", options=options).args
    mm.cleanup_models()
    trained = {"diffusion_model.double_blocks.0.img_attn.qkv", "diffusion_model.double_blocks.0.txt_attn.proj",
               "diffusion_model.single_blocks.0.linear1", "diffusion_model.single_blocks.0.linear2"}
    assert trained <= set(adapter.modules) and len(adapter.modules) == 6  # 4 in the double block, 2 in the single
    assert any(float(f.up.abs().max()) > 0 for f in adapter.modules.values()), "two steps moved the factors"
    ours = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=adapter, block_strengths="").args[0]
    theirs = stock(comfy, tiny_flux, "csa_flux_trained.safetensors")
    assert set(ours.patches) == set(theirs.patches) == {m + ".weight" for m in adapter.modules}
    assert max_relative_difference(ours, theirs, theirs.patches) < FLOAT32_PRECISION


def official_qr_flux_file(seed: int, rank: int = 4, q_seed: int = 0) -> dict:
    """A QR-LoRA file as the official FLUX trainer saves it (luna-ai-lab/QR-LoRA train_qrlora_flux_deltaR.py: its
    save hook writes '<diffusers module>.lora.q / lora.delta_r / lora.base_r.weight', FluxPipeline.save_lora_weights
    prefixes 'transformer.'): its default targets in the double block (attention and feed-forward) and the single
    block's attention. Q is orthonormal and, for one base, the same in every file (q_seed); ΔR differs (seed)."""
    targets = {m: shape for m, shape in DIFFUSERS_FLUX_MODULES.items()
               if m.split(".attn.")[-1] in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                            "add_v_proj", "to_add_out") or ".ff" in m}
    q_generator, generator = torch.Generator().manual_seed(q_seed), torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inner) in targets.items():
        q = torch.linalg.qr(torch.randn(out, rank, generator=q_generator))[0].contiguous()
        tensors[f"{name}.lora.q.weight"] = q
        tensors[f"{name}.lora.base_r.weight"] = torch.randn(rank, inner, generator=q_generator).triu()
        tensors[f"{name}.lora.delta_r.weight"] = (torch.randn(rank, inner, generator=generator) * 0.02).triu()
    return tensors


def test_an_official_flux_qr_lora_file_applies_and_merges_on_its_shared_q(comfy, comfy_base, tiny_flux):
    """Load Adapter reads the official FLUX QR-LoRA form (ΔW = Q ΔR on the diffusers names, slices of the fused
    weights included): applied, it equals stock LoraLoaderModelOnly given the same Q and ΔR as a diffusers LoRA; two
    files of one base merge on their shared Q at rank r per projection."""
    folder = comfy_base / "models" / "loras"
    content, style = official_qr_flux_file(seed=1), official_qr_flux_file(seed=2)
    save_file(content, str(folder / "csa_flux_qr_content.safetensors"))
    save_file(style, str(folder / "csa_flux_qr_style.safetensors"))
    as_lora = {k.replace(".lora.q.weight", ".lora_B.weight").replace(".lora.delta_r.weight", ".lora_A.weight"): v
               for k, v in content.items() if not k.endswith("base_r.weight")}
    save_file(as_lora, str(folder / "csa_flux_qr_as_lora.safetensors"))
    adapter = load(comfy, "csa_flux_qr_content.safetensors", role="content")
    assert adapter.method == "qr-lora" and not adapter.ignored_keys
    ours, _, report = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=adapter, block_strengths="").args
    theirs = stock(comfy, tiny_flux, "csa_flux_qr_as_lora.safetensors")
    assert "not used" not in report and set(ours.patches) == set(theirs.patches)
    assert max_relative_difference(ours, theirs, theirs.patches) < FLOAT32_PRECISION
    merged, merged_adapter, merge_report = comfy["CSA_QRMerge"].execute(
        model=tiny_flux, content=adapter, style=load(comfy, "csa_flux_qr_style.safetensors", role="style"),
        lambda_content=1.0, lambda_style=0.7, interference="off").args
    assert "shared-q" in merge_report and merged_adapter.modules["diffusion_model.double_blocks.0.img_attn.qkv"].rank == 12


def test_ipl_on_flux_is_refused_naming_the_family(comfy, tiny_flux):
    with pytest.raises(ValueError, match="this model is Flux, conditioned through T5 as well"):
        comfy["CSA_ZeroShotAdapt"].execute(model=tiny_flux, vae=None, clip=None, clip_vision=None, mapper_name="x",
                                           images=None, source_label="photo", target_label="sketch", iterations=1,
                                           lr=1e-3, rank=2, seed=0)


# -- Apply Localized Residual on FLUX: LAG on the double blocks' joint attention ------------------------------------

STATE_KEY = "csa.localized_residual"


@pytest.fixture(scope="module")
def residual_module(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.localized_residual")


@pytest.fixture(scope="module")
def flux_residual(comfy, tiny_flux):
    return comfy["CSA_NewResidualAdapter"].execute(model=tiny_flux, rank_fraction=0.05, init_scale=0.5, seed=7).args[0]


def flux_tokenizer_clip():
    """A CLIP object holding FLUX's own tokenizers (CLIP-L and T5) and no encoder weights: no small T5 exists, so the
    tests find concept words in real T5 tokens and give the conditioning directly."""
    import comfy.sd
    from comfy.text_encoders.flux import FluxTokenizer

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = FluxTokenizer(), {}
    return clip


def localized_flux(residual_module, model, residual, lag=True, mode="fixed value", value=1.5, positions=(2, 3)):
    """Apply Localized Residual's patching of ``model`` (what the node does after encoding the prompt), with concept
    token positions inside flux_sample's 8 text tokens."""
    patched = model.clone()
    targets = residual_module.residual_targets(residual, patched)
    settings = residual_module.LocalizedResidualSettings(tuple(positions), mode, value, (0.0, 1000.0), lag)
    residual_module.install_residuals(patched, settings, targets, 1.0)
    return patched


def recorded_masks(patched) -> dict:
    return patched.model_options["transformer_options"][STATE_KEY].recorded


def test_flux_residuals_sit_on_the_double_blocks_image_attention_output(flux_residual):
    assert flux_residual.module_names == ["diffusion_model.double_blocks.0.img_attn.proj"] and flux_residual.ranks == [154]


def test_concept_words_on_flux_are_found_in_the_t5_tokens(residual_module):
    clip = flux_tokenizer_clip()
    prompt = "a photo of zxqvbnk dog on the beach"
    positions = residual_module.concept_positions(clip, prompt, "zxqvbnk dog", "t5xxl")
    t5 = [int(t[0]) for chunk in clip.tokenize(prompt)["t5xxl"] for t in chunk]
    hugging_face = clip.tokenizer.t5xxl.tokenizer  # the T5 tokenizer itself: each word's ids, minus its </s>
    words = [t for word in ("zxqvbnk", "dog") for t in hugging_face(word)["input_ids"][:-1]]
    assert [t5[p] for p in positions] == words and positions == list(range(positions[0], positions[0] + len(words)))
    with pytest.raises(ValueError, match="gives no 't5xxl' tokens"):
        residual_module.concept_positions(comfy_sd_clip_l_only(), prompt, "dog", "t5xxl")


def comfy_sd_clip_l_only():
    import comfy.sd
    from comfy.sd1_clip import SD1Tokenizer

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer, clip.tokenizer_options = SD1Tokenizer(), {}
    return clip


def test_lag_on_flux_with_a_zero_mask_is_the_base_model_bit_for_bit(residual_module, tiny_flux, flux_residual):
    """A threshold no token reaches: the joint attention is captured (a mask per sampler step, one value per image
    token of the 8x8 patch grid), every value 0, and the sampled latent equals the base model's exactly."""
    patched = localized_flux(residual_module, tiny_flux, flux_residual)
    assert torch.equal(flux_sample(patched), flux_sample(tiny_flux))
    masks = recorded_masks(patched)
    assert len(masks) == 2 and all(set(m) == {("double", 0)} for m in masks.values())
    assert all(m[("double", 0)].shape == (1, 64) and not m[("double", 0)].any() for m in masks.values())


def test_lag_off_on_flux_is_the_residual_everywhere_and_lag_on_acts_on_the_attended_tokens(
        comfy, residual_module, tiny_flux, flux_residual):
    """Without LAG the run-time residual is the residual merged as a LoRA (Apply Adapters); with LAG on the top 25% of
    image tokens it is neither that nor the base model, and exactly 16 of the 64 tokens carry it at every step. Show
    Attention Mask draws them on the picture's grid."""
    everywhere = flux_sample(localized_flux(residual_module, tiny_flux, flux_residual, lag=False))
    merged = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=flux_residual, block_strengths="").args[0]
    base = flux_sample(tiny_flux)
    assert not torch.equal(everywhere, base)
    assert torch.allclose(everywhere, flux_sample(merged), atol=1e-4 * float(everywhere.abs().max()))
    localized = localized_flux(residual_module, tiny_flux, flux_residual, mode="top-k percent", value=25)
    partial = flux_sample(localized)
    assert not torch.allclose(partial, everywhere) and not torch.allclose(partial, base)
    assert all(int(m[("double", 0)].sum()) == 16 for m in recorded_masks(localized).values())
    grid, mask = comfy["CSA_ShowAttentionMask"].execute(model=localized, samples={"samples": partial},
                                                        steps_shown=2).args
    assert mask.shape == (1, 128, 128) and float(mask.mean()) == pytest.approx(0.25)


def test_lag_on_flux_chains_to_another_packs_block_replacement_and_attention_override(
        residual_module, tiny_flux, flux_residual):
    """Another pack's double-block replacement and attention override (here: counting wrappers) stay in the chain:
    both still run at every call, and the zero-mask model still equals that pack's model bit for bit."""
    calls = {"block": 0, "attention": 0}

    def other_block(args, extra):
        calls["block"] += 1
        return extra["original_block"](args)

    def other_attention(func, *args, **kwargs):
        calls["attention"] += 1
        return func(*args, **kwargs)

    other = tiny_flux.clone()
    other.set_model_patch_replace(other_block, "dit", "double_block", 0)
    other.model_options["transformer_options"]["optimized_attention_override"] = other_attention
    expected = flux_sample(other)
    alone = dict(calls)
    assert alone["block"] == 2 and alone["attention"] == 2 * 2  # 2 steps x (the double and the single block)
    chained = localized_flux(residual_module, other, flux_residual)
    assert torch.equal(flux_sample(chained), expected)
    assert calls == {"block": 2 * alone["block"], "attention": 2 * alone["attention"]}
    assert len(recorded_masks(chained)) == 2


# -- every trainer on FLUX: a few flow-matching steps, the saved file read back --------------------------------------

def flux_options(comfy):
    return comfy["CSA_TrainingOptions"].execute(
        batch_size=1, accumulation=1, schedule="constant", warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision="fp32").args[0]


def flux_trainer_run(comfy, tiny_flux, trainer: str, filename: str):
    """(the node's adapter, its saved file's name) for one trainer, two steps on the tiny FLUX."""
    data, options = flux_training_data(comfy), flux_options(comfy)
    common = {"model": tiny_flux, "data": data, "seed": 0, "filename": filename, "overwrite": True,
              "resume_from": "none", "options": options}
    if trainer == "QR-LoRA":
        out = comfy["CSA_TrainQRLoRA"].execute(targets="attention projections", blocks="", rank=2, steps=2, lr=1e-3,
                                               loss="v", role="content", **common).args
    elif trainer.startswith("ConsisLoRA"):
        out = comfy["CSA_TrainConsisLoRA"].execute(
            mode=trainer.split()[-1], block_split="custom", content_blocks="double_blocks.0", style_blocks="single_blocks.0",
            rank=2, alpha=2.0, steps=2, switch_step=1, lr_epsilon=1e-3, lr_x0=1e-3, style_steps=1, style_lr=1e-3,
            style_noise_offset=0.03, **common).args
    elif trainer == "Personalized Residual":
        out = comfy["CSA_TrainPersonalizedResidual"].execute(
            identifier="sks", class_word="photo", caption="", rank_fraction=0.002, steps=2, lr=1e-3, loss="epsilon",
            **common).args
    elif trainer == "B4M Content":
        out = comfy["CSA_TrainB4MContent"].execute(
            targets="attention projections", blocks="", rank=4, steps=2, lr=1e-3, lr_auxiliary=1e-4,
            orthogonal_init=True, loss="epsilon", auxiliary_data=flux_training_data(comfy, seed=8), **common).args
    elif trainer == "B4M Make":  # both runs from one seed, then Make with one step of its joint fine-tune
        runs = [comfy[f"CSA_TrainB4M{run}"].execute(
            targets="attention projections", blocks="", rank=4, steps=2, lr=1e-3, lr_auxiliary=1e-4,
            orthogonal_init=True, loss="epsilon", **{**common, "filename": ""}).args[0] for run in ("Content", "Style")]
        out = comfy["CSA_B4MMake"].execute(
            content_run=runs[0], style_run=runs[1], model=tiny_flux, content_data=data,
            style_data=flux_training_data(comfy, seed=8), steps=1, lr=1e-4, preconditioned=True, reg=1e-4,
            loss="epsilon", seed=0, filename=filename, overwrite=True, options=options).args
    elif trainer == "ZipLoRA":
        content, style = (load(comfy, n) for n in ("csa_flux_diffusers.safetensors", "csa_flux_kohya.safetensors"))
        out = comfy["CSA_TrainZipLoRA"].execute(
            model=tiny_flux, content=content, style=style, content_data=data, style_data=flux_training_data(comfy, seed=8),
            steps=2, lr=0.01, similarity_weight=0.01, penalty="mean |m_c ⊙ m_s| (common implementation)",
            loss="epsilon", seed=0, filename=filename, overwrite=True, resume_from="none", options=options).args
    return out[0], out[-1]


FLUX_TRAINERS = ["QR-LoRA", "ConsisLoRA content", "ConsisLoRA style", "Personalized Residual", "B4M Content",
                 "B4M Make", "ZipLoRA"]


@pytest.mark.parametrize("trainer", FLUX_TRAINERS)
def test_every_trainer_runs_flow_matching_on_flux_and_its_file_reads_back(comfy, tiny_flux, loras, trainer):
    """Each trainer two steps on the tiny FLUX (Training Latents; the flow path): the factors move, and its saved
    file, read back by Load Adapter and by stock LoraLoaderModelOnly, changes the model as the node's adapter does."""
    import comfy.model_management as mm

    name = f"csa_flux_{trainer.lower().replace(' ', '_')}.safetensors"
    adapter, path = flux_trainer_run(comfy, tiny_flux, trainer, name)
    mm.cleanup_models()
    assert path.endswith(name) and adapter.modules
    if trainer != "ZipLoRA":  # its output is the folded merge of two trained LoRAs, not factors from zero
        assert any(float(f.down.abs().max() if trainer == "QR-LoRA" else f.up.abs().max()) > 0
                   for f in adapter.modules.values()), "two steps moved the factors"
    ours = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=adapter, block_strengths="").args[0]
    loaded = load(comfy, name)
    assert loaded.method == adapter.method
    read_back = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=loaded, block_strengths="").args[0]
    if trainer == "QR-LoRA":  # its file keeps Q, ΔR and base R (QR-LoRA's own form, for QR Merge); stock reads the
        name = "csa_flux_qr_as_lora"  # LoRA Save Adapter writes of it (up = Q, down = ΔR)
        comfy["CSA_SaveAdapter"].execute(adapter=loaded, filename=name, subfolder="", key_form="comfy", overwrite=True,
                                         model=tiny_flux)
        name += ".safetensors"
    theirs = stock(comfy, tiny_flux, name)
    assert set(ours.patches) == set(read_back.patches) == set(theirs.patches)
    assert max_relative_difference(read_back, ours, ours.patches) < FLOAT32_PRECISION
    assert max_relative_difference(ours, theirs, theirs.patches) < FLOAT32_PRECISION


def test_the_flux_block_split_is_splitflux_single_blocks_and_keeps_the_blocks_a_model_has(comfy, comfy_base, flux_meta,
                                                                                          tiny_flux):
    """block_split 'auto' on FLUX.1-dev (full depth, meta device) is SplitFlux's: content the first ten single blocks,
    style the other 28, their attention projections (linear1 / linear2) the targets; on the one-block FLUX the style
    part has no block left, refused naming the blocks there are."""
    from comfy_host import pack_module

    train = pack_module(comfy_base, "nodes.train_adapters")
    trainers = pack_module(comfy_base, "core.trainers")
    content, style = train.resolve_block_split(flux_meta, "auto", "", "")
    assert (content, style) == trainers.BLOCK_SPLITS["FLUX (SplitFlux)"]
    assert content == tuple(f"single_blocks.{i}" for i in range(10)) and len(style) == 28
    shapes = flux_meta.model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in shapes.items()}
    assert len(trainers.select_targets(shapes, "attention in blocks", content)) == 10 * 2
    assert len(trainers.select_targets(shapes, "attention in blocks", style)) == 28 * 2
    with pytest.raises(ValueError, match="has none of its style blocks .* its single blocks are 0: choose 'custom'"):
        train.resolve_block_split(tiny_flux, "auto", "", "")


def test_new_residual_adapter_on_flux_dev_puts_one_residual_in_each_double_block(comfy, flux_meta):
    """On FLUX.1-dev's layout: 19 residuals, each double block's img_attn.proj, rank 5% of 3072."""
    residual = comfy["CSA_NewResidualAdapter"].execute(model=flux_meta, rank_fraction=0.05, init_scale=0.0,
                                                       seed=0).args[0]
    assert residual.module_names == [f"diffusion_model.double_blocks.{i}.img_attn.proj" for i in sorted(range(19), key=str)]
    assert set(residual.ranks) == {154} and residual.base == "Flux"


def test_a_residual_on_sd3_is_refused_naming_the_model(comfy, tiny_sd3):
    with pytest.raises(ValueError, match="SD3 has no place for a Personalized Residual"):
        comfy["CSA_NewResidualAdapter"].execute(model=tiny_sd3, rank_fraction=0.05, init_scale=0.0, seed=0)


# -- the Content-Style Guider on a guidance-distilled FLUX --------------------------------------------------------

def test_the_content_style_guider_on_flux_at_cfg_1(comfy, comfy_base, tiny_flux, loras):
    """FLUX.1-dev is guidance-distilled (its guidance is an input; it is sampled at cfg 1). The guider with both λ 0 is
    stock CFGGuider at cfg 1 on the model with the content and the style adapter applied; a term whose positive and
    negative pass use the same adapter and the same prompt adds exactly nothing (its two extra passes run); with
    different prompts it moves the result. The guidance prompts are given as conditioning (no small T5 to encode
    them), so the node's own CLIP encoding is not exercised here."""
    import comfy.samplers as samplers
    from comfy_host import pack_module

    guidance = pack_module(comfy_base, "nodes.consistency_guidance")
    runtime = pack_module(comfy_base, "nodes.runtime_adapters")
    content, style = load(comfy, loras["diffusers"]), load(comfy, loras["kohya"])
    generator = torch.Generator().manual_seed(3)

    def conditioning():
        return [[torch.randn(1, 8, 4096, generator=generator),
                 {"pooled_output": torch.randn(1, 768, generator=generator), "guidance": 3.5}]]

    positive, other = conditioning(), conditioning()
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=generator)
    sigmas = samplers.calculate_sigmas(tiny_flux.get_model_object("model_sampling"), "simple", 2).cpu()
    base = frozenset({"cc", "ss"})

    def guided(lambdas: dict, prompts: dict):
        patched = tiny_flux.clone()
        runtime.install_switched_adapters(patched, {"cc": content, "ss": style, "sc": content, "cs": style}, base)
        guider = guidance.ContentStyleCFGGuider(patched)
        guider.inner_set_conds({"positive": positive, "negative": positive, **prompts})
        guider.configure(1.0, lambdas, base)
        return guider.sample(noise, latent, samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0)

    plain = guided({"content": 0.0, "style": 0.0}, {})
    merged = comfy["CSA_ApplyAdapters"].execute(model=tiny_flux, adapter=content, adapter_2=style,
                                                block_strengths="").args[0]
    stock_guider = samplers.CFGGuider(merged)
    stock_guider.set_conds(positive, positive)
    stock_guider.set_cfg(1.0)
    expected = stock_guider.sample(noise, latent, samplers.sampler_object("euler"), sigmas, disable_pbar=True,
                                   seed=0)
    assert torch.allclose(plain, expected, atol=1e-4 * float(expected.abs().max()))
    same = {"content_positive": positive, "content_negative": positive}
    assert torch.equal(guided({"content": 1.0, "style": 0.0}, same), plain)  # cc and sc are one adapter here
    moved = guided({"content": 1.0, "style": 0.0}, {"content_positive": other, "content_negative": positive})
    assert not torch.allclose(moved, plain)
