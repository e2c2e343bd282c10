"""B4M (content / style runs, make, fine-tune) and Personalized Residual training on the tiny SD1.5 model (ComfyUI
in-process): frozen halves, seeds, the make definition, base weights, files in B4M's layout, reload, residual
targets and ranks, cancel."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from support.weights import checkpoint_weights

pytestmark = pytest.mark.host

SIZE = 64
RANK = 8


@pytest.fixture(scope="module")
def training(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.training")


def images_node(comfy, images, captions):
    return comfy["CSA_TrainingImages"].execute(images=images, captions=captions, image_folder="", repeats=1,
                                               trigger_word="", resolution=SIZE).args[0]


def pictures(seed: int, colour) -> torch.Tensor:
    images = torch.rand(2, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed)) * 0.3
    images[:, 16:48, 16:48] = torch.tensor(colour)
    return images


@pytest.fixture(scope="module")
def sets(comfy):
    return {"content": images_node(comfy, pictures(0, [0.9, 0.2, 0.1]), "a sks square"),
            "style": images_node(comfy, pictures(1, [0.1, 0.3, 0.9]), "a zkz block"),
            "aux": images_node(comfy, pictures(2, [0.2, 0.9, 0.2]), "a green thing")}


def options(comfy, **changes):
    values = {"batch_size": 2, "accumulation": 1, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
              "grad_clip": 1.0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "save_every": 0, "preview_prompt": "",
              "preview_every": 0, "preview_seed": 0, "precision": "fp32", **changes}
    return comfy["CSA_TrainingOptions"].execute(**values).args[0]


def b4m_run(comfy, tiny_sd15, run, data, aux, seed=0, filename="", steps=3, **extra):
    model, clip, vae = tiny_sd15
    node = comfy["CSA_TrainB4MContent" if run == "content" else "CSA_TrainB4MStyle"]
    inputs = {"targets": "attention projections", "blocks": "", "rank": RANK, "steps": steps, "lr": 1e-2,
              "lr_auxiliary": 1e-3, "orthogonal_init": True, "loss": "epsilon", "seed": seed, "filename": filename,
              "overwrite": True, "resume_from": "none", "options": options(comfy), **extra}
    return node.execute(model=model, clip=clip, vae=vae, data=data, auxiliary_data=aux, **inputs).args


def halves(factors):
    up, down = factors.up.flatten(1), factors.down.flatten(1)
    return up[: up.shape[0] // 2], down[:, : down.shape[1] // 2]


@pytest.fixture(scope="module")
def runs(comfy, tiny_sd15, sets):
    content = b4m_run(comfy, tiny_sd15, "content", sets["content"], sets["aux"], filename="host_b4m_content")
    style = b4m_run(comfy, tiny_sd15, "style", sets["style"], sets["aux"], filename="host_b4m_style")
    return content, style


def test_b4m_runs_keep_frozen_halves_share_them_by_seed_and_train_the_free_halves(comfy, comfy_base, tiny_sd15, runs):
    from core.b4m import plp_lora

    model = tiny_sd15[0]
    unet_keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
    (content, curve, _, path), (style, *_) = runs
    assert content.method == "b4m" and content.role == "content" and style.role == "style" and len(content.modules) == 32
    assert content.metadata["csa.b4m_seed"] == "0" and content.metadata["csa.b4m_run"] == "content"
    shapes = {n: tuple(f.delta_shape) for n, f in content.modules.items()}
    for name, factors in content.modules.items():
        start = plp_lora(shapes[name], RANK, 0, name)
        for a, b, c in zip(halves(factors), halves(style.modules[name]), halves(start)):
            assert torch.equal(a, c) and torch.equal(b, c), f"{name}: a frozen half changed"
        rows, cols = factors.up.shape[0] // 2, factors.down.shape[1] // 2
        # content: down's free half on the content images, up's free half on the auxiliary data; style: the mirror
        assert not torch.equal(factors.down[:, cols:], start.down[:, cols:])
        assert not torch.equal(factors.up[rows:], start.up[rows:])
        assert not torch.equal(style.modules[name].up[rows:], start.up[rows:])
    after = model.model.state_dict()
    file = checkpoint_weights(unet_keys)
    assert all(torch.equal(after[k].to(file[k].dtype), file[k]) for k in unet_keys), "a base weight changed"
    assert curve.shape == (1, 256, 512, 3) and path.endswith("host_b4m_content.safetensors")
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        recipe = json.loads(handle.metadata()["csa.created_with"])
    assert all(k.startswith("unet.unet.") and k.endswith((".lora.up.weight", ".lora.down.weight")) for k in keys)
    assert "unet.unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight" in keys
    assert recipe["settings"]["lr_auxiliary"] == 1e-3 and recipe["settings"]["auxiliary_part"] == "up"
    assert recipe["second_data"]["captions"] == ["a green thing"]


def predictions(comfy, training, model, modules: dict, loaded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the trainer's prediction with ``modules``, the prediction with the reloaded file applied by Apply Adapters, the
    base model's) on one fixed input."""
    import comfy.model_management as mm

    x, sigma = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([1.5])
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4))
    patched = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=loaded, block_strengths="").args[0]
    try:
        with torch.no_grad():
            expected = training.cc.denoised(training.Trainee(model, modules).model, x, sigma, cond, {})
            training.cc.load_for_direct_calls(patched)
            reloaded = training.cc.denoised(patched, x, sigma, cond, {})
            base = training.cc.denoised(model, x, sigma, cond, {})
    finally:
        mm.unload_all_models()
    return expected, reloaded, base


def test_b4m_file_reloads_and_reproduces_the_prediction(comfy, tiny_sd15, runs, training):
    content = runs[0][0]
    loaded = comfy["CSA_LoadAdapter"].execute(adapter_name="host_b4m_content.safetensors", strength=1.0,
                                              part="whole file", role="from file").args[0]
    assert loaded.method == "b4m" and loaded.role == "content" and loaded.metadata["csa.b4m_seed"] == "0"
    expected, reloaded, base = predictions(comfy, training, tiny_sd15[0], content.modules, loaded)
    assert torch.allclose(reloaded, expected, atol=1e-6) and (expected - base).abs().max() > 0


def test_b4m_all_linear_splits_convs_and_feed_forwards_into_halves_and_reloads(comfy, tiny_sd15, sets, training):
    from core.b4m import plp_lora

    # no weight decay: a free half that moved was moved by its gradient
    adapter, _, _, path = b4m_run(comfy, tiny_sd15, "content", sets["content"], sets["aux"], steps=2,
                                  filename="host_b4m_all_linear", targets="all linear",
                                  options=options(comfy, weight_decay=0.0))
    shapes = {n: tuple(f.delta_shape) for n, f in adapter.modules.items()}
    convs = [n for n, s in shapes.items() if len(s) == 4]
    assert len(adapter.modules) > 32 and convs and any(n.endswith("ff.net.2") for n in shapes)
    for name, factors in adapter.modules.items():
        start = plp_lora(shapes[name], RANK, 0, name)
        assert factors.up.shape == start.up.shape and factors.down.shape == start.down.shape, name
        assert all(torch.equal(a, b) for a, b in zip(halves(factors), halves(start))), f"{name}: a frozen half changed"
        assert not torch.equal(factors.down, start.down), f"{name}: down's free half did not train"
    loaded = comfy["CSA_LoadAdapter"].execute(adapter_name="host_b4m_all_linear.safetensors", strength=1.0,
                                              part="whole file", role="from file").args[0]
    assert len(loaded.modules) == len(adapter.modules) and path.endswith("host_b4m_all_linear.safetensors")
    expected, reloaded, base = predictions(comfy, training, tiny_sd15[0], adapter.modules, loaded)
    assert torch.allclose(reloaded, expected, atol=1e-6) and (expected - base).abs().max() > 0


def test_orthogonal_non_square_option_draws_non_square_frozen_halves_and_make_refuses_mixed_inits(comfy, tiny_sd15,
                                                                                                   runs, sets):
    from core.b4m import plp_lora

    adapter, _, _, path = b4m_run(comfy, tiny_sd15, "content", sets["content"], sets["aux"], steps=2,
                                  filename="host_b4m_non_square", orthogonal_non_square=True,
                                  options=options(comfy, weight_decay=0.0))
    shapes = {n: tuple(f.delta_shape) for n, f in adapter.modules.items()}
    non_square = [n for n, s in shapes.items() if s[0] != s[1]]
    assert non_square and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in non_square)
    for name, factors in adapter.modules.items():
        start = plp_lora(shapes[name], RANK, 0, name, non_square=True)
        assert all(torch.equal(a, b) for a, b in zip(halves(factors), halves(start))), f"{name}: a frozen half changed"
        assert halves(factors)[0].abs().sum() > 0, f"{name}: up's frozen half is zero"
        assert not torch.equal(factors.down, start.down), f"{name}: down's free half did not train"
    with safe_open(path, "pt") as handle:
        assert json.loads(handle.metadata()["csa.created_with"])["settings"]["orthogonal_non_square"] is True
    with pytest.raises(ValueError, match=r"one seed and one init \(orthogonal_init, orthogonal_non_square\)"):
        make(comfy, tiny_sd15, adapter, runs[1][0])


def make(comfy, tiny_sd15, content, style, **extra):
    inputs = {"steps": 0, "lr": 1e-3, "preconditioned": True, "reg": 1e-4, "loss": "epsilon", "seed": 0,
              "filename": "", "overwrite": True, **extra}
    return comfy["CSA_B4MMake"].execute(content_run=content, style_run=style, model=tiny_sd15[0], **inputs).args


def test_make_equals_its_definition_from_memory_and_from_files_and_refuses_other_seeds(comfy, tiny_sd15, runs, sets):
    content, style = runs[0][0], runs[1][0]
    made, _, _, path = make(comfy, tiny_sd15, content, style, filename="host_b4m_made")
    for name, factors in made.modules.items():
        cols = factors.down.shape[1] // 2
        assert torch.equal(factors.up, style.modules[name].up)
        assert torch.equal(factors.down[:, :cols], style.modules[name].down[:, :cols])
        assert torch.equal(factors.down[:, cols:], content.modules[name].down[:, cols:])
    load = comfy["CSA_LoadAdapter"]
    from_files = make(comfy, tiny_sd15, *[load.execute(adapter_name=f"host_b4m_{run}.safetensors", strength=1.0,
                                                       part="whole file", role="from file").args[0]
                                          for run in ("content", "style")])[0]
    assert all(torch.equal(from_files.modules[n].delta(), f.delta()) for n, f in made.modules.items())
    reloaded = load.execute(adapter_name="host_b4m_made.safetensors", strength=1.0, part="whole file",
                            role="from file").args[0]
    assert reloaded.method == "b4m" and reloaded.metadata["csa.b4m_run"] == "made" and path
    other = b4m_run(comfy, tiny_sd15, "style", sets["style"], None, seed=7, steps=1)[0]
    with pytest.raises(ValueError, match=r"content run \(seed 0\) and the style run \(seed 7\) have different frozen"):
        make(comfy, tiny_sd15, content, other)
    with pytest.raises(ValueError, match="content_run is a B4M style run"):
        make(comfy, tiny_sd15, style, content)


def test_make_fine_tune_keeps_frozen_halves_and_needs_both_image_sets(comfy, tiny_sd15, runs, sets):
    content, style = runs[0][0], runs[1][0]
    model, clip, vae = tiny_sd15
    made = make(comfy, tiny_sd15, content, style)[0]
    tuned, curve, *_ = make(comfy, tiny_sd15, content, style, steps=2, clip=clip, vae=vae,
                            content_data=sets["content"], style_data=sets["style"], options=options(comfy))
    changed = 0
    for name, factors in tuned.modules.items():
        assert all(torch.equal(a, b) for a, b in zip(halves(factors), halves(made.modules[name]))), name
        changed += not torch.equal(factors.down, made.modules[name].down)
    assert changed == len(made.modules) and curve.shape == (1, 256, 512, 3)
    with pytest.raises(ValueError, match="needs content_data, style_data"):
        make(comfy, tiny_sd15, content, style, steps=2)
    with pytest.raises(ValueError, match="connect a VAE to the vae input to encode the training images"):
        make(comfy, tiny_sd15, content, style, steps=2, content_data=sets["content"], style_data=sets["style"])


def test_b4m_cancel_leaves_no_file(comfy, comfy_base, tiny_sd15, sets):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            b4m_run(comfy, tiny_sd15, "content", sets["content"], sets["aux"], filename="host_b4m_cancelled")
    finally:
        mm.interrupt_current_processing(False)
    assert not list((comfy_base / "models" / "loras").glob("host_b4m_cancelled*"))


def test_personalized_residual_trains_exactly_the_proj_out_residuals_at_five_percent(comfy, tiny_sd15, sets,
                                                                                     training):
    import comfy.model_management as mm

    model, clip, vae = tiny_sd15
    unet_keys = [k for k in model.model.state_dict() if k.startswith("diffusion_model.")]
    proj_outs = sorted(k[: -len(".weight")] for k in unet_keys if k.endswith(".proj_out.weight"))
    inputs = {"identifier": "sks", "class_word": "square", "caption": "a photo of a {identifier} {class_word}",
              "rank_fraction": 0.05, "lr": 1e-2, "loss": "epsilon", "seed": 0, "filename": "host_residual",
              "overwrite": True, "resume_from": "none", "options": options(comfy, weight_decay=0.0)}
    node = comfy["CSA_TrainPersonalizedResidual"]
    residual, curve, _, path = node.execute(model=model, clip=clip, vae=vae, data=sets["content"], steps=12,
                                            **inputs).args
    assert sorted(residual.modules) == proj_outs and len(proj_outs) == 4
    assert all(f.rank == 16 and f.scale == 1.0 and f.up.abs().sum() > 0 for f in residual.modules.values())  # 5% of 320
    assert residual.role == "concept" and residual.method == "personalized-residuals"
    after, file = model.model.state_dict(), checkpoint_weights(unet_keys)
    assert all(torch.equal(after[k].to(file[k].dtype), file[k]) for k in unet_keys), "a base weight changed"
    with safe_open(path, "pt") as handle:
        meta = handle.metadata()
    recipe = json.loads(meta["csa.created_with"])
    assert recipe["data"]["captions"] == ["a photo of a sks square"] and meta["csa.concept_words"] == "sks square"
    assert recipe["stages"][0]["batch_size"] == 2 and recipe["stages"][0]["phases"][0]["target"] == "epsilon"
    untrained = training.Adapter(modules={n: training.LowRank(up=torch.zeros_like(f.up), down=f.down)
                                          for n, f in residual.modules.items()})
    losses = []
    for adapter in (residual, untrained):
        trainee = training.Trainee(model, adapter.modules)
        try:
            with torch.no_grad():
                latents, conds = training.encode_training_set(model, vae, clip, residual_data(sets, training))
                sigma = torch.tensor([0.5, 2.0])
                noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(11))
                x0_hat = trainee.predict(latents + sigma.view(-1, 1, 1, 1) * noise, sigma, conds)
                losses.append(float((((x0_hat - latents) / sigma.view(-1, 1, 1, 1)) ** 2).mean()))
        finally:
            mm.unload_all_models()
    assert losses[0] < losses[1], losses
    loaded = comfy["CSA_LoadAdapter"].execute(adapter_name="host_residual.safetensors", strength=1.0,
                                              part="whole file", role="from file").args[0]
    patched, positive = comfy["CSA_ApplyLocalizedResidual"].execute(
        model=model, residual=loaded, clip=clip, prompt="a photo of a sks square", concept_words="sks square",
        lag=True, threshold_mode="median", threshold=0.5, start_percent=0.0, end_percent=1.0, strength=1.0).args
    assert patched is not model and positive
    assert default_steps(comfy) == (150, 1e-3)


def residual_data(sets, training):
    import dataclasses

    return dataclasses.replace(sets["content"], captions=("a photo of a sks square",) * 2)


def default_steps(comfy):
    spec = comfy["CSA_TrainPersonalizedResidual"].INPUT_TYPES()["required"]
    return spec["steps"][1]["default"], spec["lr"][1]["default"]


@pytest.fixture(scope="module")
def compat(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.comfy_compat")


def test_residual_with_token_embedding_trains_only_the_residuals_and_the_identifier_rows(comfy, tiny_sd15, sets,
                                                                                          training, compat):
    import comfy.model_management as mm

    model, clip, vae = tiny_sd15
    key = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
    module = "text_encoders." + key[: -len(".weight")]
    node = comfy["CSA_TrainPersonalizedResidual"]
    inputs = {"identifier": "sks", "class_word": "square", "caption": "a photo of a {identifier} {class_word}",
              "rank_fraction": 0.05, "lr": 1e-2, "loss": "epsilon", "seed": 0, "filename": "host_residual_token",
              "overwrite": True, "resume_from": "none", "options": options(comfy, weight_decay=0.0)}
    residual, _, _, path = node.execute(model=model, clip=clip, vae=vae, data=sets["content"], steps=6,
                                        learn_token_embedding=True, token_lr=5e-2, **inputs).args
    ids = [t for t in compat.token_ids(clip, "sks") if t not in compat.special_token_ids(clip)]
    token = residual.modules[module]
    expected_up = torch.zeros(49408, len(ids))
    expected_up[ids, torch.arange(len(ids))] = 1.0
    assert torch.equal(token.up, expected_up) and token.down.abs().sum() > 0 and token.scale == 1.0
    proj_outs = [n for n in residual.modules if n.endswith(".proj_out")]
    assert sorted(residual.modules) == sorted(proj_outs + [module]) and len(proj_outs) == 4
    change = token.delta()
    assert torch.equal(change[ids].abs().sum(1) > 0, torch.ones(len(ids), dtype=torch.bool))
    assert torch.count_nonzero(change.abs().sum(1)) == len(ids), "a row other than the identifier's changed"
    assert all(p.grad is None and not p.requires_grad for p in (*model.model.parameters(),
                                                                *clip.cond_stage_model.parameters()))
    file = checkpoint_weights(["transformer.text_model.embeddings.token_embedding.weight"], "cond_stage_model.")
    base = clip.cond_stage_model.state_dict()[key]
    assert torch.equal(base.to(torch.float32), next(iter(file.values())).to(torch.float32)), "the CLIP's embedding changed"
    with safe_open(path, "pt") as handle:
        assert module + ".lora_up.weight" in handle.keys() and module + ".lora_down.weight" in handle.keys()
        recipe = json.loads(handle.metadata()["csa.created_with"])
    assert recipe["settings"]["learn_token_embedding"] and recipe["settings"]["token_ids"] == ids

    # the file, applied by Apply Adapters with the CLIP, reproduces the trainee's conditioning and prediction
    loaded = comfy["CSA_LoadAdapter"].execute(adapter_name="host_residual_token.safetensors", strength=1.0,
                                              part="whole file", role="from file").args[0]
    patched_model, patched_clip, report = comfy["CSA_ApplyAdapters"].execute(model=model, adapter=loaded,
                                                                              clip=clip).args
    assert "5 of 5 modules mapped" in report, report
    caption = "a photo of a sks square"
    trainee = training.Trainee(model, residual.modules, clip, training.TrainedToken(
        module, key, tuple(ids), base[ids].float().clone(), base.dtype))
    try:
        with torch.no_grad():
            trained = trainee.conditioning(caption)[0][0]
            reloaded = patched_clip.encode_from_tokens_scheduled(patched_clip.tokenize(caption))[0][0]
            plain = clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0][0]
            assert torch.allclose(trained, reloaded, atol=1e-6) and not torch.allclose(trained, plain, atol=1e-3)
            latents, captions = training.encode_training_set(model, vae, clip, residual_data(sets, training),
                                                             as_captions=True)
            sigma = torch.tensor([0.5, 2.0])
            noisy = latents + sigma.view(-1, 1, 1, 1) * torch.randn(latents.shape,
                                                                    generator=torch.Generator().manual_seed(3))
            x0_trainee = trainee.predict(noisy, sigma, captions)
        mm.unload_all_models()
        with torch.no_grad():
            cc = compat
            conds = [cc.model_conds(patched_model, patched_clip.encode_from_tokens_scheduled(
                patched_clip.tokenize(c)), noisy[:1]) for c in captions]
            cc.load_for_direct_calls(patched_model)
            x0_file = cc.denoised(patched_model, noisy, sigma, cc.batch_conds(conds), {})
        assert torch.allclose(x0_trainee, x0_file, atol=1e-4), (x0_trainee - x0_file).abs().max()
    finally:
        mm.unload_all_models()
    # Apply Localized Residual patches its CLIP with the token rows: its conditioning is the trained one
    _, positive = comfy["CSA_ApplyLocalizedResidual"].execute(
        model=model, residual=loaded, clip=clip, prompt=caption, concept_words="sks square", lag=True,
        threshold_mode="median", threshold=0.5, start_percent=0.0, end_percent=1.0, strength=1.0).args
    assert torch.allclose(positive[0][0], reloaded, atol=1e-6)
    with pytest.raises(ValueError, match="no caption contains the identifier 'qqv'"):
        node.execute(model=model, clip=clip, vae=vae, data=sets["content"], steps=1, learn_token_embedding=True,
                     **{**inputs, "identifier": "qqv", "caption": "", "filename": ""})


def test_token_gradient_through_comfyuis_encode_equals_an_out_of_place_forward(comfy, comfy_base, tiny_sd15, training,
                                                                               compat):
    """ComfyUI's CLIP adds residuals in place; under in_place_safe_autograd its own encode gives the gradient that the
    same layers run out of place give."""
    from comfy_host import pack_module

    features = pack_module(comfy_base, "nodes.clip_features")
    _, clip, _ = tiny_sd15
    key = compat.token_embedding_key(clip)
    ids = tuple(t for t in compat.token_ids(clip, "sks") if t not in compat.special_token_ids(clip))
    rows, _ = compat.token_embedding_rows(clip, key, ids)
    token = training.TrainedToken("text_encoders." + key[:-7], key, ids, rows)  # float32: no rounding
    weights = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(5))
    gradients = []
    with training.grad_enabled():
        training.make_autograd_safe(clip.cond_stage_model)
        for path in ("comfyui", "out of place"):
            change = (torch.randn(len(ids), 768, generator=torch.Generator().manual_seed(6)) * 0.1).requires_grad_()
            tokens = compat.tokens_with_vectors(clip, "a photo of a sks square", token.vectors(change))
            if path == "comfyui":
                with compat.in_place_safe_autograd():
                    cond = clip.encode_from_tokens_scheduled(tokens)[0][0]
            else:
                encoder = clip.cond_stage_model.clip_l
                embeds, _, _, _ = encoder.process_tokens([[t[0] for t in tokens["l"][0]]], torch.device("cpu"))
                text = encoder.transformer.text_model
                x = embeds + text.embeddings.position_embedding.weight.float()
                mask = torch.full((77, 77), -torch.finfo(x.dtype).max).triu_(1)
                cond = text.final_layer_norm(features._encoder_out_of_place(text.encoder, x, mask)).float()
            (cond * weights).sum().backward()
            gradients.append(change.grad)
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-4, atol=1e-6), (gradients[0] - gradients[1]).abs().max()


def test_residual_with_token_embedding_resumes_where_it_stopped(comfy, comfy_base, tiny_sd15, sets):
    model, clip, vae = tiny_sd15
    inputs = {"identifier": "sks", "class_word": "square", "caption": "a photo of a {identifier} {class_word}",
              "rank_fraction": 0.05, "lr": 1e-2, "loss": "epsilon", "seed": 0, "overwrite": True, "steps": 4,
              "learn_token_embedding": True, "token_lr": 5e-2}
    node = comfy["CSA_TrainPersonalizedResidual"]
    straight = node.execute(model=model, clip=clip, vae=vae, data=sets["content"], filename="host_token_straight",
                            resume_from="none", options=options(comfy, save_every=2), **inputs).args[0]
    resumed = node.execute(model=model, clip=clip, vae=vae, data=sets["content"], filename="host_token_resumed",
                           resume_from="host_token_straight_step000002.safetensors", options=options(comfy),
                           **inputs).args[0]
    state = {}
    for name in ("host_token_straight", "host_token_resumed"):
        with safe_open(str(comfy_base / "models" / "loras" / f"{name}.optimizer-state"), "pt") as handle:
            state[name] = json.loads(handle.metadata()["csa.losses"])
    assert state["host_token_resumed"] == pytest.approx(state["host_token_straight"], abs=1e-6)
    assert sorted(resumed.modules) == sorted(straight.modules)
    for name, factors in straight.modules.items():
        assert torch.allclose(resumed.modules[name].down, factors.down, atol=1e-6), name
        assert torch.allclose(resumed.modules[name].up, factors.up, atol=1e-6), name
