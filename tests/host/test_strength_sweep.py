"""Strength Sweep on the tiny SD1.5 model: every cell against a separate single run of the stock nodes, the grid's
layout, scores under the cells, the progress bar and cancel."""
from __future__ import annotations

import sys

import pytest
import torch

import comfy_host
import model_names as names
from core.scores import GridLayout, cell_picture, display_scale, sweep_cells

sys.path.insert(0, str(comfy_host.REPO_ROOT / "bench"))
from score_folder import tiny_encoder  # noqa: E402

pytestmark = pytest.mark.host

SEED, STEPS, CFG = 7, 3, 4.0
PROMPTS = {"content_positive": "a {c}", "content_negative": "a {v}",
           "style_positive": "in the style of {v}", "style_negative": "in the style of {c}"}


def load(comfy, name, strength=1.0, part="whole file", role="from file"):
    return comfy["CSA_LoadAdapter"].execute(adapter_name=name, strength=strength, part=part, role=role).args[0]


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


@pytest.fixture(scope="module")
def setting(comfy, tiny_sd15):
    model, clip, vae = tiny_sd15
    return {"model": model, "vae": vae, "positive": encode(clip, "a dotted circle"), "negative": encode(clip, ""),
            "latent_image": {"samples": torch.zeros(1, 4, 8, 8)}, "content": load(comfy, names.DEMO_CONTENT_NAME),
            "style": load(comfy, names.DEMO_LORA_NAME)}


def sweep(comfy, setting, x_values, y_values, mode="adapter strengths", **extra):
    return comfy["CSA_StrengthSweep"].execute(
        **setting, mode=mode, cfg=CFG, seed=SEED, steps=STEPS, sampler_name="euler", scheduler="normal",
        x_values=x_values, y_values=y_values, **extra).args


def ksampler_then_decode(comfy, model, setting):
    latent = comfy["KSampler"]().sample(model, SEED, STEPS, CFG, "euler", "normal", setting["positive"],
                                        setting["negative"], setting["latent_image"], denoise=1.0)[0]
    return comfy["VAEDecode"]().decode(setting["vae"], latent)[0]


def apply(comfy, model, adapter):
    return comfy["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args[0]


def eight_bit(images):
    return (images.clamp(0, 1) * 255).round() / 255


def test_adapter_strength_cells_equal_single_runs_in_grid_order(comfy, setting):
    grid, images, report = sweep(comfy, setting, "0, 1", "0.5, 1")
    cells = sweep_cells([0.0, 1.0], [0.5, 1.0])
    assert images.shape == (4, 64, 64, 3) and len(report.splitlines()) == 4
    scale = display_scale(64, 64)
    layout = GridLayout(rows=2, cols=2, cell_width=64 * scale, cell_height=64 * scale)
    assert grid.shape == (1, layout.size[1], layout.size[0], 3)
    for index, (row, col, x, y) in enumerate(cells):
        model = apply(comfy, apply(comfy, setting["model"], load(comfy, names.DEMO_CONTENT_NAME, x)),
                      load(comfy, names.DEMO_LORA_NAME, y))
        single = ksampler_then_decode(comfy, model, setting)
        assert torch.equal(images[index], single[0]), f"cell {index} (x {x}, y {y}) differs from its single run"
        left, top = layout.cell_origin(row, col)
        drawn = grid[0, top:top + layout.cell_height, left:left + layout.cell_width]
        assert torch.equal(drawn, eight_bit(cell_picture(single, scale))), f"cell {index} is not where it belongs"
        assert report.splitlines()[index] == f"row {row} col {col}: content strength {x:g}, style strength {y:g}"
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2]), "strengths had no effect"


def test_qr_merge_cells_equal_single_qr_merge_runs(comfy, setting):
    interference = "style without content directions"
    _, images, _ = sweep(comfy, setting, "0, 1", "0.7", mode="QR Merge lambdas", interference=interference)
    for index, (_, _, x, y) in enumerate(sweep_cells([0.0, 1.0], [0.7])):
        merged = comfy["CSA_QRMerge"].execute(model=setting["model"], content=setting["content"], style=setting["style"],
                                              lambda_content=x, lambda_style=y, interference=interference).args[0]
        assert torch.equal(images[index], ksampler_then_decode(comfy, merged, setting)[0]), f"cell {index}"
    assert not torch.equal(images[0], images[1])


def test_guider_cells_equal_single_sampler_custom_advanced_runs(comfy, tiny_sd15, setting):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, RandomNoise, SamplerCustomAdvanced

    model, clip, vae = tiny_sd15
    blora = [names.DEMO_BLORA_NAMES[i // 2] for i in range(4)]
    parts = ["B-LoRA content block", "B-LoRA style block"] * 2
    slots = ("content_of_content", "style_of_content", "content_of_style", "style_of_style")
    adapters = {slot: load(comfy, name, part=part) for slot, name, part in zip(slots, blora, parts)}

    def guider(lambda_content, lambda_style):
        return comfy["CSA_ContentStyleGuider"].execute(
            model=model, clip=clip, positive=encode(clip, "a sks in the style of zwx"), negative=setting["negative"],
            cfg=CFG, lambda_content=lambda_content, lambda_style=lambda_style, content_token="sks",
            style_token="zwx", **PROMPTS, **adapters).args[0]
    _, images, report = comfy["CSA_GuiderStrengthSweep"].execute(
        guider=guider(0.0, 0.0), vae=vae, latent_image=setting["latent_image"], seed=SEED, steps=STEPS,
        sampler_name="euler", scheduler="normal", x_values="0, 1.5", y_values="0").args
    assert report.splitlines()[1] == "row 0 col 1: lambda_content 1.5, lambda_style 0"
    # λ_style 0 keeps the test light (no style passes); a swapped axis would put 1.5 on λ_style and fail the match
    for index, (_, _, x, y) in enumerate(sweep_cells([0.0, 1.5], [0.0])):
        latent = SamplerCustomAdvanced.execute(
            noise=RandomNoise.execute(noise_seed=SEED).args[0], guider=guider(x, y),
            sampler=KSamplerSelect.execute(sampler_name="euler").args[0],
            sigmas=BasicScheduler.execute(model=model, scheduler="normal", steps=STEPS, denoise=1.0).args[0],
            latent_image=setting["latent_image"]).args[0]
        assert torch.equal(images[index], comfy["VAEDecode"]().decode(vae, latent)[0][0]), f"cell {index}"
    assert not torch.equal(images[0], images[1])


def test_scores_of_each_cell_are_the_score_nodes_and_printed_under_it(comfy, comfy_base, setting, tmp_path):
    encoders = {"content_encoder": tiny_encoder("dinov2", tmp_path, 1), "style_encoder": tiny_encoder("clip", tmp_path, 2)}
    references = {"content_images": torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(1)),
                  "style_images": torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(2))}
    grid, images, report = sweep(comfy, setting, "0, 1", "1", **encoders, **references)
    plain_grid = sweep(comfy, setting, "0", "1")[0]  # the first cell again, without scores
    layout = GridLayout(rows=1, cols=2, cell_width=128, cell_height=128)
    for index, line in enumerate(report.splitlines()):
        scores = comfy["CSA_ScoreContentStylePrompt"].execute(images=images[index:index + 1], **encoders,
                                                               **references).args
        assert line.endswith(f": content {scores[0]:.4f}  style {scores[1]:.4f}"), line
        assert float(caption_of(grid, layout, index).min()) < 0.5, "no score printed under the cell"
    plain_layout = GridLayout(rows=1, cols=1, cell_width=128, cell_height=128)
    assert plain_grid.shape == (1, plain_layout.size[1], plain_layout.size[0], 3)
    assert float(caption_of(plain_grid, plain_layout, 0).min()) == 1.0, "a caption without scores"


def caption_of(grid, layout, col):
    """The strip under the cell in row 0, column ``col``."""
    left, top = layout.cell_origin(0, col)
    return grid[0, top + layout.cell_height:top + layout.cell_height + layout.caption, left:left + layout.cell_width]


def test_progress_covers_every_step_and_cancel_stops_after_the_current_cell(comfy, setting):
    from comfy import model_management, utils

    calls = []

    def hook(value, total, preview, node_id=None):
        calls.append((value, total))
        if value == STEPS:
            model_management.interrupt_current_processing(True)
    previous = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            sweep(comfy, setting, "0, 1", "0, 1")
    finally:
        utils.set_progress_bar_global_hook(previous)
        model_management.interrupt_current_processing(False)
    assert calls[:STEPS] == [(step, 4 * STEPS) for step in range(1, STEPS + 1)]
    assert max(value for value, _ in calls) == STEPS, "a step of the second cell ran after cancel"
    calls.clear()
    utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append(value))
    try:
        sweep(comfy, setting, "0", "0, 1")
    finally:
        utils.set_progress_bar_global_hook(previous)
    assert calls[-1] == 2 * STEPS and sorted(calls) == calls


def test_bad_values_and_a_foreign_guider_name_the_input(comfy, setting, tiny_sd15):
    from comfy.samplers import CFGGuider

    with pytest.raises(ValueError, match="^x_values: 'a' is not a list of numbers"):
        sweep(comfy, setting, "a", "1")
    with pytest.raises(ValueError, match="^y_values: give at least one strength"):
        sweep(comfy, setting, "1", "")
    with pytest.raises(ValueError, match="^guider: a CFGGuider has no λ_content / λ_style"):
        comfy["CSA_GuiderStrengthSweep"].execute(
            guider=CFGGuider(tiny_sd15[0]), vae=tiny_sd15[2], latent_image=setting["latent_image"],
            seed=SEED, steps=STEPS, sampler_name="euler", scheduler="normal", x_values="0", y_values="0")
    with pytest.raises(ValueError, match="^style_encoder: connect a CLIP ViT CLIP_VISION to score against style_images"):
        sweep(comfy, setting, "0", "0", style_images=torch.rand(1, 8, 8, 3))
