"""Apply Localized Residual on the tiny SD1.5 model with real ComfyUI sampling."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

PROMPT = "a photo of zxqvbnk dog on the beach"
WORDS = "zxqvbnk dog"


@pytest.fixture(scope="module")
def residual(comfy, tiny_sd15):
    return comfy["CSA_NewResidualAdapter"].execute(model=tiny_sd15[0], rank_fraction=0.05, init_scale=0.5,
                                                       seed=7).args[0]


def localized(comfy, tiny_sd15, residual, lag=True, mode="median", value=0.5, start=0.0, end=1.0, model=None):
    model_in, clip, _ = tiny_sd15
    return comfy["CSA_ApplyLocalizedResidual"].execute(
        model=model or model_in, residual=residual, clip=clip, prompt=PROMPT, concept_words=WORDS, lag=lag,
        threshold_mode=mode, threshold=value, start_percent=start, end_percent=end, strength=1.0).args


def sample(comfy, model, positive, negative, batch=2, steps=2):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, 16, 16)}
    return nodes.common_ksampler(model, 42, steps, 3.0, "euler", "normal", positive, negative, latent)[0]["samples"]


@pytest.fixture(scope="module")
def negative(tiny_sd15):
    clip = tiny_sd15[1]
    return clip.encode_from_tokens_scheduled(clip.tokenize(""))


@pytest.fixture(scope="module")
def node_module(comfy, comfy_base):
    from comfy_host import pack_module

    return pack_module(comfy_base, "nodes.localized_residual")


def test_multi_token_words_are_found_and_missing_words_named(node_module, tiny_sd15):
    clip = tiny_sd15[1]
    positions = node_module.concept_positions(clip, PROMPT, "zxqvbnk")
    assert len(positions) > 1 and positions == list(range(positions[0], positions[0] + len(positions)))
    assert positions[0] == 4  # start token, "a", "photo", "of"
    dog = node_module.concept_positions(clip, PROMPT, "dog")
    assert dog == [positions[-1] + 1]
    with pytest.raises(ValueError, match="concept word 'cat' is not in the prompt"):
        node_module.concept_positions(clip, PROMPT, "zxqvbnk cat")


def test_zero_mask_is_exactly_the_base_model(comfy, tiny_sd15, residual, negative):
    patched, positive = localized(comfy, tiny_sd15, residual, mode="fixed value", value=1.5)
    base = sample(comfy, tiny_sd15[0], positive, negative)
    assert torch.equal(sample(comfy, patched, positive, negative), base)


def test_full_mask_equals_the_residual_applied_globally(comfy, tiny_sd15, residual, negative):
    patched, positive = localized(comfy, tiny_sd15, residual, mode="fixed value", value=-1.0)
    lag_off, _ = localized(comfy, tiny_sd15, residual, lag=False)
    weight_patched = comfy["CSA_ApplyAdapters"].execute(model=tiny_sd15[0], adapter=residual, block_strengths="").args[0]
    reference = sample(comfy, weight_patched, positive, negative)
    assert not torch.allclose(reference, sample(comfy, tiny_sd15[0], positive, negative), atol=1e-3)
    assert torch.allclose(sample(comfy, patched, positive, negative), reference, atol=1e-3, rtol=1e-4)
    assert torch.allclose(sample(comfy, lag_off, positive, negative), reference, atol=1e-3, rtol=1e-4)


def test_outside_the_mask_block_outputs_equal_the_base_model(comfy, tiny_sd15, residual, negative):
    patched, positive = localized(comfy, tiny_sd15, residual, mode="top-k percent", value=30)
    outputs = {}

    def capture(name):
        def hook(module, args, output):
            outputs[name] = output.detach().clone()
        return hook
    proj_out = tiny_sd15[0].model.diffusion_model.input_blocks[1][1].proj_out
    handle = proj_out.register_forward_hook(capture("base"))
    try:
        sample(comfy, tiny_sd15[0], positive, negative, steps=1)
        handle.remove()
        handle = proj_out.register_forward_hook(capture("lag"))
        sample(comfy, patched, positive, negative, steps=1)
    finally:
        handle.remove()
    state = patched.model_options["transformer_options"]["csa.localized_residual"]
    (masks,) = state.recorded.values()
    mask = masks[("input", 1)]  # (batch, h, w), cond chunk
    assert mask.shape == (2, 16, 16) and 0.25 < mask.float().mean() < 0.35
    full = torch.cat([mask, mask])[:, None].expand_as(outputs["base"])  # cond and uncond use the cond mask
    assert torch.equal(outputs["lag"][~full], outputs["base"][~full])
    assert not torch.allclose(outputs["lag"][full], outputs["base"][full])


def test_a_prior_attn2_replacement_still_runs(comfy, tiny_sd15, residual, negative):
    calls = []

    def prior(q, k, v, extra_options):
        calls.append(extra_options["block"])
        import comfy.ldm.modules.attention as attention
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])
    model = tiny_sd15[0].clone()
    model.set_model_attn2_replace(prior, "output", 1)  # a less specific key, as many packs use
    patched, positive = localized(comfy, tiny_sd15, residual, model=model)
    sample(comfy, patched, positive, negative, steps=1)
    assert ("output", 1) in calls
    state = patched.model_options["transformer_options"]["csa.localized_residual"]
    assert ("output", 1) in next(iter(state.recorded.values()))


def test_show_attention_mask_outputs(comfy, tiny_sd15, residual, negative):
    patched, positive = localized(comfy, tiny_sd15, residual)
    samples = {"samples": sample(comfy, patched, positive, negative, steps=3)}
    grid, mask = comfy["CSA_ShowAttentionMask"].execute(model=patched, samples=samples, steps_shown=8).args
    # 4 blocks x 3 steps of 64-pixel cells, with room for the title, block and step labels (nodes/plots.py)
    assert grid.shape == (1, 4 * 64 + 90, 3 * 64 + 200, 3) and mask.shape == (2, 128, 128)
    assert float(grid.min()) < 0.1 and float(grid.max()) == 1.0
    with pytest.raises(ValueError, match="no localized residual"):
        comfy["CSA_ShowAttentionMask"].execute(model=tiny_sd15[0], samples=samples, steps_shown=8)


def test_start_end_percent_gate_the_residual(comfy, tiny_sd15, residual, negative):
    never, positive = localized(comfy, tiny_sd15, residual, lag=False, start=0.5, end=0.5)
    assert torch.equal(sample(comfy, never, positive, negative), sample(comfy, tiny_sd15[0], positive, negative))


def test_sdxl_layout_installs_on_every_transformer(comfy, node_module, sdxl_meta):
    residual = comfy["CSA_NewResidualAdapter"].execute(model=sdxl_meta, rank_fraction=0.05, init_scale=0.0,
                                                           seed=1).args[0]
    assert residual.ranks == [32, 64]  # 5% of 640 and 1280
    patched = sdxl_meta.clone()
    targets = node_module.residual_targets(residual, patched)
    settings = node_module.LocalizedResidualSettings((5,), "median", 0.5, (0.0, 100.0), True)
    node_module.install_residuals(patched, settings, targets, 1.0)
    replaced = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert ("output", 0, 9) in replaced and ("input", 7, 1) in replaced and len(replaced) == 70
    assert "diffusion_model.output_blocks.0.1.proj_out.forward" in patched.object_patches


@pytest.mark.parametrize("clone_copies", ["deep copy (0.3.75)", "dicts only (newer ComfyUI)"])
def test_a_clone_made_downstream_keeps_its_own_masks(comfy, tiny_sd15, residual, negative, clone_copies):
    """A LoRA loader after Apply Localized Residual clones the model: each model shows the masks of its own runs,
    whether the clone deep-copied model_options (0.3.75) or copied only their dicts and shares the state object
    (newer releases' ModelPatcher.clone, reproduced here with ComfyUI's own copy_nested_dicts)."""
    from comfy.patcher_extension import copy_nested_dicts

    first, positive = localized(comfy, tiny_sd15, residual)
    downstream = comfy["CSA_ApplyAdapters"].execute(model=first, adapter=residual.replace(strength=0.5),
                                                    block_strengths="").args[0]
    newer = clone_copies.startswith("dicts")
    if newer:
        downstream.model_options = copy_nested_dicts(first.model_options)
        key = "csa.localized_residual"
        assert downstream.model_options["transformer_options"][key] is first.model_options["transformer_options"][key]
    first_samples = {"samples": sample(comfy, first, positive, negative, steps=3)}
    first_grid, first_mask = comfy["CSA_ShowAttentionMask"].execute(model=first, samples=first_samples,
                                                                    steps_shown=8).args
    if not newer:  # with a shared state, a clone that has not run shows its source's last run
        with pytest.raises(ValueError, match="no attention masks were recorded"):
            comfy["CSA_ShowAttentionMask"].execute(model=downstream, samples=first_samples, steps_shown=8)
    downstream_samples = {"samples": sample(comfy, downstream, positive, negative, batch=1, steps=2)}
    again_grid, again_mask = comfy["CSA_ShowAttentionMask"].execute(model=first, samples=first_samples,
                                                                    steps_shown=8).args
    assert torch.equal(again_grid, first_grid) and torch.equal(again_mask, first_mask)
    own_grid, own_mask = comfy["CSA_ShowAttentionMask"].execute(model=downstream, samples=downstream_samples,
                                                                steps_shown=8).args
    assert own_grid.shape == (1, 4 * 64 + 90, 2 * 64 + 200, 3) and own_mask.shape[0] == 1
