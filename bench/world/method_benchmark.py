"""Method benchmark on the world: does each method combine a held-out content and a held-out style better than the
naive sum of two LoRAs? Two protocols, one table each.

    .venv/bin/python bench/world/method_benchmark.py [--protocol entangled] [--cases base:6,base:1,held-out:6]
                                                     [--seeds 3] [--steps 250] [--only naive,guider] [--workers 2]
                                                     [--estimate]
    make benchmark   (the block premise, then both protocols)

Entangled (--protocol entangled, the papers' setting): each adapter learns from references that carry the other
half, as a photo of one dog carries its own style and one painting its own subject. Per held-out pair and case, the
content adapter learns from N pictures of the held-out shape in one style (a base style, checkered, or the pair's
other held-out style), captioned 'a sks'; the style adapter from N pictures of the held-out texture on one shape (a
circle), captioned 'a zkz' (B-LoRA's and ConsisLoRA's 'A [v]'); N = 1 (B-LoRA / ConsisLoRA's single image) or 6
(few-image, as B4M / QR-LoRA / DreamBooth). Besides the measures below, each row reports the leaks: the content
reference's own style in 'a <base style> sks' and in the composition, the style reference's own shape in 'a zkz
<base shape>' (style adapter alone) and in the composition, and the headline per case. Results go to
bench/world/benchmark/entangled/. The rest of this docstring describes the disentangled protocol (the default).

For every held-out content x style pair (star, heart x zigzag, speckled) and training seed, each trainer of the pack
learns the content (the shape in every base style, captioned 'a <style> sks') and the style (the texture on every
base shape, captioned 'a zkz <shape>') from the same world pictures with the same budget (steps x batch 4; ConsisLoRA's
style mode splits its steps between its two stages). Each row composes them with the pack's nodes (Apply Adapters,
QR Merge, Compose Content and Style, the Content-Style Guider) and samples with ComfyUI's own samplers
(common_ksampler, or CFGGuider.sample for the guider: what SamplerCustomAdvanced runs), Euler, CFG 4, 4 sampling seeds
(one batch). Rows with a grid (naive strengths, guider λ) are judged on the composed prompt for every grid point and
the best point is then measured in full: that choice is made on the measured pictures and is reported as such.

Measures (the world evaluators, bench/world/evaluators.py):
- both right / content / style: 'a zkz sks' with both adapters; content = the content evaluator says the held-out
  shape. The strict style evaluator cannot always be satisfied on this base model: the world VAE's own round trip of
  real speckled pictures is labelled speckled 0% of the time (zigzag 100%; measured each run on 24 fresh round trips,
  in the notes; an earlier world gave 0% for both), so the headline uses a *VAE-drawable* style judgement: a linear
  probe trained on VAE round trips of real pictures of the seven styles (style-classifier features + colour
  histogram; its accuracy on fresh round trips, 100% for every style in the 2026-12-01 runs, is measured each run and
  printed beside it). Strict figures too.
- recontextualisation: 'a <base style> sks' (the first --prompts of RECONTEXT_STYLES): the held-out shape drawn in
  the prompted base style.
- leakage (style adapter alone): 'a zkz <base shape>' for the first --leakage-shapes of LEAKAGE_SHAPES (all six by
  default), sampled with the row's style adapter alone, as the row applies it (Row.style_alone: the whole adapter at
  the row's style strength; B-LoRA / ConsisLoRA and the guider row: the style adapter's style block): does the content
  evaluator still see the prompted base shape? It depends on the style adapter only, so it is measured once per
  (held-out style, training seed) cell, and rows that apply the same style adapter the same way (the naive sum at style
  strength 1, both QR Merge rows, both residual rows: the plain style LoRA) share its pictures. `--style-alone-only`
  measures only this (retraining the style adapters) and adds it to the run in <out>/results.json.
- leakage with both adapters: the same prompt (the first --prompts base shapes) with the row's composed model: does
  the content adapter override a prompt without its trigger?
- scene fidelity: 'a <base style> sks and a <style> <shape>' (the first --scene-prompts of SCENE_OBJECTS), drawn on the
  world's wide two-object canvas (128x64): the second, base object judged in its own region (evaluators.judge_regions) is
  still its prompted shape and style. Runs before issue 14's world drew at 64x64 and measure a world that could not
  draw two objects.
- change outside the object: generated pictures have no ground-truth mask, so the object is estimated (pixels further
  than 0.25 from the world's background colour, dilated 2 px) and the mean absolute difference from the background
  colour outside it is reported (0..1).
- diversity: mean pairwise RMS distance between the 4 sampling seeds' pictures of 'a zkz sks'.
- training CPU seconds (both adapters of the row), trainable parameters (both), sampling CPU seconds per picture
  (process time on one thread: the machine is shared).
Spreads: standard deviation over training seeds x sampling seeds (per-image rates), or over training seeds.

Workers: the cells (pair x training seed, training-seed major) are split into --workers contiguous runs, one process
each (one thread each: on this 2-core machine the default 2 halves the wall time). A grid row's best point is chosen on
every worker's composed pictures (each writes its hits into a shared folder and waits for the others'), and the
workers' raw figures are merged into the table one process would have produced; a split training seed trains its
adapters in both workers (7 instead of 6 per worker and trainer at the defaults).

Rows are entries of ROWS (name -> trainer + compose function); a trainer is an entry of TRAINERS. A method that cannot be
measured (IPL on the world) is a row marked "not yet" with the reason.

Outputs (full runs only): the table appended to bench/RESULTS.md; bench/world/benchmark/: results.json (every figure),
one contact sheet per row (rows: pairs; columns: training seed x sampling seed, of 'a zkz sks') and, when matplotlib is
installed, bar charts with error bars (``--charts-only`` redraws them from results.json).

Cost (CPU seconds on one thread of this machine), measured by the first full run (2026-12-01, the defaults: 4 pairs,
3 training seeds, 250 steps, 4 sampling seeds, one recontextualisation, leakage and scene prompt per cell; two
workers): 12,603 CPU s in all, 7,100 s wall with other work beside it. Per training step (batch 4): LoRA 0.40 s, QR-LoRA
0.37, ConsisLoRA / B-LoRA 0.31 (two blocks), B4M 0.90 (two data sets per step), Personalized Residual 0.34; sampling
1.6 s per picture (Euler 20 steps, CFG, decoding and judging included), 2.8x that under the guider with both λ on; the
judge's round trips ~60 s per worker. The estimate from these rates is 12,715 CPU s for that run (+1%), 3.2 CPU hours
in one process, the longest of two workers 1.77 hours; for the partial run of 2026-11-23 (star x zigzag, one seed,
150 steps, naive / guider / QR-LoRA), which took 809 CPU s, it gives 759 (`--estimate` prints the figures for any
settings). Every run prints its estimate first (per worker: the longest worker's CPU time is the run's wall time on
free cores); wall time is longer when the cores are shared. The smoke size (--smoke: two pairs, one seed, 2 steps, 2
pictures per prompt, 2 sampling steps, every row) takes about 2 minutes. The style-alone leakage pass of 2026-12-02
(--style-alone-only on the first run: 30 style adapters, 720 pictures) took 8,284 CPU s (71 min wall in two workers)
where these rates give 4,716: that machine ran about 1.75x slower per step (LoRA 0.68-0.76 s, B4M 1.5-1.7 s); the
rates above are the first run's, on a faster machine of the same kind. The K-LoRA and ZipLoRA rows (added
2026-12-07, in none of those runs) add about 0.6 CPU hours to the defaults, with ZipLoRA's merge step rate
(ZIPLORA_STEP_SECONDS) a guess until a full run measures it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import harness  # noqa: E402
from harness import parse_args, record  # noqa: E402
from train_b4m_residual_demos import RECIPES as B4M_RESIDUAL_RECIPES  # noqa: E402
from train_demo_adapters import RECIPES as DEMO_RECIPES  # noqa: E402
from train_demo_adapters import CONTENT_WORD, STYLE_WORD, run_trainer, training_data, training_options  # noqa: E402
from world import (BACKGROUND, BASE_SHAPES, BASE_STYLES, HELD_OUT_SHAPES, HELD_OUT_STYLES, LANDSCAPE, SQUARE,  # noqa: E402
                   STYLES, render)

OUT = HERE / "benchmark"
PAIRS = [(shape, style) for shape in HELD_OUT_SHAPES for style in HELD_OUT_STYLES]
COMPOSED = f"a {STYLE_WORD} {CONTENT_WORD}"
# Recontextualisation styles and leakage shapes, in the order --prompts takes them (varied first: colour, pattern).
RECONTEXT_STYLES = ("red", "checkered", "striped", "gradient", "dotted")
LEAKAGE_SHAPES = ("circle", "triangle", "square", "cross", "ring", "diamond")
# Scene fidelity: the second object, next to the content trigger in the first recontextualisation style.
SCENE_OBJECTS = (("square", "striped"), ("ring", "checkered"), ("triangle", "dotted"), ("cross", "gradient"),
                 ("diamond", "checkered"))
assert set(RECONTEXT_STYLES) == set(BASE_STYLES) and set(LEAKAGE_SHAPES) == set(BASE_SHAPES)
assert all(style != RECONTEXT_STYLES[0] for _, style in SCENE_OBJECTS)
SAMPLING = {"seed": 1000, "cfg": 4.0}

# -- the two protocols ----------------------------------------------------------------------------------------------
# An adapter's target is the held-out shape (content) or texture (style) it learns. Disentangled: the bare name, learnt
# from the shape in every base style / the texture on every base shape (the data has already separated them).
# Entangled (the papers' setting): 'name:context:count', learnt from ``count`` pictures of the held-out shape in one
# style / the held-out texture on one shape, captioned 'a sks' / 'a zkz' (B-LoRA's and ConsisLoRA's 'A [v]'; the
# world has no class word for its shapes). The reference's own style (content) and own shape (style) are what may leak.
ENTANGLED_STYLE_SHAPE = "circle"  # the one shape the style reference is drawn on
ENTANGLED_CONTENT_STYLE = "checkered"  # the base style of the content reference ('base' cases)
CONTEXTS = {"base": "a base style", "held-out": "the pair's other held-out style"}
DEFAULT_CASES = "base:6,base:1,held-out:6"


def held_out(target: str) -> str:
    """The held-out shape or texture an adapter's target names (the target itself in the disentangled protocol)."""
    return target.split(":")[0]


def reference_context(target: str) -> str | None:
    """The entangled reference's own style (content) or shape (style); None in the disentangled protocol."""
    return target.split(":")[1] if ":" in target else None


def entangled_pairs(pairs: list, cases: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """Every held-out pair in every case (context, pictures): ('star:checkered:6', 'zigzag:circle:6'), ..."""
    def content_style(style: str, context: str) -> str:
        return ENTANGLED_CONTENT_STYLE if context == "base" else next(s for s in HELD_OUT_STYLES if s != style)
    return [(f"{shape}:{content_style(style, context)}:{count}", f"{style}:{ENTANGLED_STYLE_SHAPE}:{count}")
            for shape, style in pairs for context, count in cases]


def parse_cases(text: str) -> list[tuple[str, int]]:
    cases = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        context, _, count = part.partition(":")
        if context not in CONTEXTS or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--cases: {part!r} is not <context>:<pictures> with context one of {', '.join(CONTEXTS)} "
                             f"and pictures >= 1 (e.g. {DEFAULT_CASES})")
        cases.append((context, int(count)))
    return cases


def reference_data(ctx, role: str, target: str):
    """The Training Images an adapter of ``target`` learns from, in either protocol (see held_out)."""
    if reference_context(target) is None:
        return training_data(ctx.nodes, role, target, ctx.args.per_pair)
    name, context, count = target.split(":")
    samples = [render(name, context, 500 + i) if role == "content" else render(context, name, 500 + i)
               for i in range(int(count))]
    images = torch.from_numpy(np.stack([s.image for s in samples])).float() / 255
    return ctx.nodes["CSA_TrainingImages"].execute(
        images=images, captions="a {trigger}", image_folder="", repeats=1, resolution=64,
        trigger_word=CONTENT_WORD if role == "content" else STYLE_WORD).args[0]

# Learning rate and its schedule per trainer: the demo adapters' recipes (train_demo_adapters.py,
# train_b4m_residual_demos.py; ConsisLoRA / B-LoRA: lr is the x0 rate, ε runs at twice it). Every trainer gets the
# same steps x batch (not the recipes' steps).
RECIPES = {**DEMO_RECIPES, "b-lora": DEMO_RECIPES["consislora"], **B4M_RESIDUAL_RECIPES}
# What the record says of each trainer's recipe (the residual has no rank: 5% of the channels).
RECORDED_RECIPES = {method: {key: recipe[key] for key in ("rank", "lr", "schedule") if key in recipe}
                    for method, recipe in RECIPES.items()}
# Measured CPU seconds (one thread, this machine; see the docstring): per training step (batch 4) and per picture.
# Measured by the first full run (2026-12-01, two workers; per adapter CPU s / 250 steps, pictures from the rows with
# no training left to do); the partial run of 2026-11-23 had given 0.45 / 0.43 / 0.31 s per step, 1.7 s per picture.
STEP_SECONDS = {"lora": 0.40, "qr": 0.37, "consislora": 0.31, "b-lora": 0.31, "b4m": 0.90, "residual": 0.34}
PICTURE_SECONDS, GUIDED_FACTOR, JUDGE_SECONDS = 1.6, 2.8, 60.0


# -- training -------------------------------------------------------------------------------------------------------

@dataclass
class Trained:
    """One trained adapter (ConsisLoRA / B-LoRA: also its two blocks) and what it cost."""
    adapter: object
    blocks: dict = field(default_factory=dict)  # 'content' / 'style' -> block adapters (ConsisLoRA, B-LoRA)
    cpu_seconds: float = 0.0
    parameters: int = 0
    data: object = None  # the Training Images it was trained on (ZipLoRA's merge trains on both adapters' own)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of every tensor of the adapter (and its blocks), by name: two runs that trained the same adapter
        give the same fingerprint, so a separate pass can show it measured the adapters of an earlier run."""
        import hashlib

        digest = hashlib.sha256()
        for adapter in (self.adapter, *(self.blocks[k] for k in sorted(self.blocks))):
            groups = [(name, {"up": f.up, "down": f.down, **f.extras}) for name, f in sorted(adapter.modules.items())]
            groups += [(name, m.tensors) for name, m in sorted(adapter.module_tensors.items())]
            for name, tensors in groups:
                for key, tensor in sorted(tensors.items()):
                    digest.update(f"{name}.{key}".encode())
                    digest.update(tensor.detach().float().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def trainable_count(adapter) -> int:
    """Trained parameters: every factor, except QR-LoRA, where only ΔR's upper triangle trains (Q is frozen)."""
    if adapter.method != "qr-lora":
        return adapter.parameter_count
    return sum(sum(max(m.down.flatten(1).shape[1] - i, 0) for i in range(m.rank)) for m in adapter.modules.values())


def pack_trainer(method: str):
    """A trainer entry: (ctx, role, target, seed) -> Trained, through the pack's trainer node for ``method``."""
    def train(ctx, role: str, target: str, seed: int) -> Trained:
        data = reference_data(ctx, role, target)
        cpu = time.process_time()
        options = training_options(ctx.nodes, schedule=RECIPES[method]["schedule"])
        out = run_trainer(ctx.nodes, ctx.model, ctx.clip, ctx.vae, method, role, data, options, ctx.args.steps,
                          RECIPES[method]["lr"], seed=seed, rank=RECIPES[method]["rank"])
        cpu = time.process_time() - cpu
        blocks = {"content": out[1], "style": out[2]} if method in ("consislora", "b-lora") else {}
        return Trained(out[0], blocks, cpu, trainable_count(out[0]), data)
    return train


def auxiliary_data(ctx):
    """B4M's auxiliary sets (the other half's data): base-world pictures, every base shape in every base style with
    their own captions, the same for every pair (drawn once)."""
    if ctx.b4m_auxiliary is None:
        samples = [render(shape, style, 700 + i) for shape in BASE_SHAPES for style in BASE_STYLES
                   for i in range(ctx.args.per_pair)]
        images = torch.from_numpy(np.stack([s.image for s in samples])).float() / 255
        ctx.b4m_auxiliary = ctx.nodes["CSA_TrainingImages"].execute(
            images=images, captions="\n".join(s.caption for s in samples), image_folder="", repeats=1, resolution=64,
            trigger_word="").args[0]
    return ctx.b4m_auxiliary


def b4m_trainer(ctx, role: str, target: str, seed: int) -> Trained:
    """Train B4M Content / Style (attention projections, the recipe's rank, ε loss; the auxiliary factor at a tenth of
    the lr, as the official 1e-4 / 1e-5). One training seed gives both runs the same frozen halves, so B4M Make accepts them."""
    data, auxiliary = reference_data(ctx, role, target), auxiliary_data(ctx)
    node = ctx.nodes["CSA_TrainB4MContent" if role == "content" else "CSA_TrainB4MStyle"]
    cpu = time.process_time()
    out = node.execute(model=ctx.model, clip=ctx.clip, vae=ctx.vae, data=data, auxiliary_data=auxiliary,
                       targets="attention projections", blocks="", rank=RECIPES["b4m"]["rank"], steps=ctx.args.steps,
                       lr=RECIPES["b4m"]["lr"], lr_auxiliary=RECIPES["b4m"]["lr"] / 10, orthogonal_init=True,
                       loss="epsilon", seed=seed, filename="", overwrite=False, resume_from="none",
                       options=training_options(ctx.nodes, schedule=RECIPES["b4m"]["schedule"])).args
    cpu = time.process_time() - cpu
    return Trained(out[0], {}, cpu, out[0].parameter_count // 2, data)  # half of each factor is frozen


def residual_trainer(ctx, role: str, target: str, seed: int) -> Trained:
    """Train Personalized Residual on the content pictures with their own captions ('a <style> sks': the world's
    caption form; the paper's 'a photo of a V* <class>' would name a class word the world never learnt)."""
    data = reference_data(ctx, role, target)
    cpu = time.process_time()
    out = ctx.nodes["CSA_TrainPersonalizedResidual"].execute(
        model=ctx.model, clip=ctx.clip, vae=ctx.vae, data=data, identifier=CONTENT_WORD, class_word=held_out(target),
        caption="",
        rank_fraction=0.05, steps=ctx.args.steps, lr=RECIPES["residual"]["lr"], loss="epsilon", seed=seed,
        filename="", overwrite=False, resume_from="none",
        options=training_options(ctx.nodes, schedule=RECIPES["residual"]["schedule"])).args
    cpu = time.process_time() - cpu
    return Trained(out[0], {}, cpu, out[0].parameter_count)


TRAINERS: dict[str, Callable] = {method: pack_trainer(method) for method in ("lora", "qr", "consislora", "b-lora")}
TRAINERS.update(b4m=b4m_trainer, residual=residual_trainer)


# -- composing and sampling -----------------------------------------------------------------------------------------

def ksampler(ctx, model) -> Callable[..., torch.Tensor]:
    """(prompt, size=(64, 64)) -> (seeds, 3, height, width) pictures in [0, 1] through ComfyUI's common_ksampler (Euler,
    normal). Every row's sampler takes the picture size: scene prompts are drawn on the world's wide canvas."""
    from evaluate import sample_caption

    return lambda prompt, size=SQUARE: sample_caption(model, ctx.clip, ctx.vae, prompt, ctx.args.sampling_seeds,
                                                      ctx.args.sample_steps, SAMPLING["cfg"], SAMPLING["seed"], size=size)


def compose_naive(ctx, content: Trained, style: Trained, variant: dict):
    model = ctx.nodes["CSA_ApplyAdapters"].execute(
        model=ctx.model, adapter=content.adapter.replace(strength=variant["content"]),
        adapter_2=style.adapter.replace(strength=variant["style"]), block_strengths="").args[0]
    return ksampler(ctx, model)


def compose_qr_merge(ctx, content: Trained, style: Trained, variant: dict):
    model = ctx.nodes["CSA_QRMerge"].execute(model=ctx.model, content=content.adapter, style=style.adapter,
                                             lambda_content=1.0, lambda_style=1.0,
                                             interference=variant["interference"]).args[0]
    return ksampler(ctx, model)


def compose_klora(ctx, content: Trained, style: Trained, variant: dict):
    """K-LoRA at the official defaults for its pattern; the changes it does not switch left out, as K-LoRA does."""
    model = ctx.nodes["CSA_KLoRA"].execute(
        model=ctx.model, content=content.adapter, style=style.adapter, pattern=variant["pattern"], alpha=1.5,
        beta=KLORA_BETA[variant["pattern"]], balance="trimmed mean of layer ratios (official code)",
        other_changes="leave out (K-LoRA)").args[0]
    return ksampler(ctx, model)


KLORA_BETA = {"S* (wrapped, official default)": 1.275, "S (linear)": 0.5}
ZIPLORA_STEPS = 100  # the paper's; smoke runs take the benchmark's --steps when fewer
ZIPLORA_STEP_SECONDS = 1.2  # not measured yet: three UNet passes of two batches of 4 (merged with grad, two teachers)


def compose_ziplora(ctx, content: Trained, style: Trained, variant: dict):
    """Train ZipLoRA at the paper's settings (λ 0.01, lr 0.01, 100 steps) on the two adapters' own training pictures,
    then apply the merged LoRA. Its merge steps are extra cost beside the two LoRAs' training (the row's costs)."""
    options = training_options(ctx.nodes, batch_size=4, precision="fp32")
    merged = ctx.nodes["CSA_TrainZipLoRA"].execute(
        model=ctx.model, clip=ctx.clip, vae=ctx.vae, content=content.adapter, style=style.adapter,
        content_data=content.data, style_data=style.data, steps=min(ZIPLORA_STEPS, ctx.args.steps), lr=0.01,
        similarity_weight=0.01, penalty="mean |m_c ⊙ m_s| (common implementation)", loss="epsilon", seed=0,
        filename="", overwrite=False, resume_from="none", options=options).args[0]
    model = ctx.nodes["CSA_ApplyAdapters"].execute(model=ctx.model, adapter=merged, block_strengths="").args[0]
    return ksampler(ctx, model)


def compose_blocks(ctx, content: Trained, style: Trained, variant: dict):
    model = ctx.nodes["CSA_ComposeContentAndStyle"].execute(
        model=ctx.model, content_image_adapter=content.adapter, style_image_adapter=style.adapter).args[0]
    return ksampler(ctx, model)


GUIDANCE_PROMPTS = {"content_positive": "a {c}", "content_negative": "a {v}",  # the world's caption form 'a <word>'
                    "style_positive": "a {v}", "style_negative": "a {c}"}


def compose_guider(ctx, content: Trained, style: Trained, variant: dict):
    """Content-Style Guider with the four ConsisLoRA blocks, sampled as SamplerCustomAdvanced samples."""
    import comfy.sample
    import comfy.samplers

    blocks = {"content_of_content": content.blocks["content"], "style_of_content": content.blocks["style"],
              "content_of_style": style.blocks["content"], "style_of_style": style.blocks["style"]}
    negative = harness.encode_prompt(ctx.clip, "")

    def sample(prompt: str, size=SQUARE) -> torch.Tensor:
        positive = harness.encode_prompt(ctx.clip, prompt)
        guider = ctx.nodes["CSA_ContentStyleGuider"].execute(
            model=ctx.model, clip=ctx.clip, positive=positive, negative=negative, cfg=SAMPLING["cfg"],
            lambda_content=variant["lambda"], lambda_style=variant["lambda"], content_token=CONTENT_WORD,
            style_token=STYLE_WORD, **GUIDANCE_PROMPTS, **blocks).args[0]
        latent = torch.zeros(ctx.args.sampling_seeds, 4, size[0] // 8, size[1] // 8)
        noise = comfy.sample.prepare_noise(latent, SAMPLING["seed"])
        sigmas = comfy.samplers.calculate_sigmas(ctx.model.get_model_object("model_sampling"), "normal",
                                                 ctx.args.sample_steps).cpu()
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True,
                                seed=SAMPLING["seed"])
        with torch.no_grad():
            return ctx.vae.decode(samples).movedim(-1, 1).clamp(0, 1)
    return sample


B4M_FINE_TUNE = {"steps": 100, "lr": 3e-4}  # a quarter of the demo's joint fine-tune (RECIPES["b4m_make"]), its lr


def compose_b4m(ctx, content: Trained, style: Trained, variant: dict):
    """B4M Make of the content run and the style run; with variant["fine_tune"], then its joint fine-tune on both runs'
    pictures (B4M_FINE_TUNE steps, at most the benchmark's --steps; the row's merge cost)."""
    steps = min(B4M_FINE_TUNE["steps"], ctx.args.steps) if variant.get("fine_tune") else 0
    tuning = {"clip": ctx.clip, "vae": ctx.vae, "content_data": content.data, "style_data": style.data,
              "options": training_options(ctx.nodes, schedule=RECIPES["b4m_make"]["schedule"])} if steps else {}
    made = ctx.nodes["CSA_B4MMake"].execute(content_run=content.adapter, style_run=style.adapter, model=ctx.model,
                                            steps=steps, lr=B4M_FINE_TUNE["lr"], preconditioned=True, reg=1e-4,
                                            loss="epsilon", seed=0, filename="", overwrite=False, **tuning).args[0]
    model = ctx.nodes["CSA_ApplyAdapters"].execute(model=ctx.model, adapter=made, block_strengths="").args[0]
    return ksampler(ctx, model)


def compose_residual(ctx, content: Trained, style: Trained, variant: dict):
    """Personalized Residuals: the style LoRA applied (Apply Adapters), then, per prompt, Apply Localized Residual with
    the content residual (LAG on or off). A prompt without the content word (leakage) has nothing to localise on and
    gets the residual without LAG."""
    import nodes as comfy_nodes

    styled = ctx.nodes["CSA_ApplyAdapters"].execute(model=ctx.model, adapter=style.adapter, block_strengths="").args[0]
    negative = harness.encode_prompt(ctx.clip, "")

    def sample(prompt: str, size=SQUARE) -> torch.Tensor:
        named = CONTENT_WORD in prompt.split()
        model, positive = ctx.nodes["CSA_ApplyLocalizedResidual"].execute(
            model=styled, residual=content.adapter, clip=ctx.clip, prompt=prompt,
            concept_words=CONTENT_WORD if named else prompt.split()[-1], lag=variant["lag"] and named,
            threshold_mode="median", threshold=0.5, start_percent=0.0, end_percent=1.0, strength=1.0).args[:2]
        latent = {"samples": torch.zeros(ctx.args.sampling_seeds, 4, size[0] // 8, size[1] // 8)}
        samples = comfy_nodes.common_ksampler(model, SAMPLING["seed"], ctx.args.sample_steps, SAMPLING["cfg"], "euler",
                                              "normal", positive, negative, latent)[0]
        with torch.no_grad():
            return ctx.vae.decode(samples["samples"]).movedim(-1, 1).clamp(0, 1)
    return sample


def style_adapter_alone(ctx, style: Trained, variant: dict):
    """Leakage's model: the row's style adapter applied alone (Apply Adapters), at the row's style strength."""
    strength = variant.get("style", 1.0)
    model = ctx.nodes["CSA_ApplyAdapters"].execute(model=ctx.model, adapter=style.adapter.replace(strength=strength),
                                                   block_strengths="").args[0]
    return ("whole adapter", strength), ksampler(ctx, model)


def style_block_alone(ctx, style: Trained, variant: dict):
    """Leakage's model for the block-split rows: the style adapter's style block alone, the only part of it that
    Compose Content and Style (and the guider's style-of-style) applies."""
    model = ctx.nodes["CSA_ApplyAdapters"].execute(model=ctx.model, adapter=style.blocks["style"],
                                                   block_strengths="").args[0]
    return ("style block",), ksampler(ctx, model)


@dataclass(frozen=True)
class Row:
    """One method: the trainer entry both adapters come from, how they are composed, the grid (best point measured),
    the papers' claim to compare with, or why the row is not measured yet."""
    name: str
    trainer: str = ""  # the content adapter's trainer (and the style adapter's, unless style_trainer is set)
    compose: Callable | None = None
    grid: tuple = ({},)
    claim: str = ""
    not_yet: str = ""
    style_trainer: str = ""
    # (ctx, style Trained, chosen variant) -> (what is applied, prompt -> pictures): the style adapter alone, as the
    # row uses it (leakage). Rows that apply the same style adapter the same way share its pictures.
    style_alone: Callable = style_adapter_alone

    @property
    def trainers(self) -> tuple[str, str]:
        return self.trainer, self.style_trainer or self.trainer


NAIVE = "naive sum of two LoRAs"
ROWS = [
    Row(NAIVE, "lora", compose_naive,
        tuple({"content": c, "style": s} for c in (1.0, 0.75) for s in (1.0, 0.75)),
        claim="the baseline every paper compares against"),
    Row("QR Merge of the plain LoRAs", "lora", compose_qr_merge, ({"interference": "off"},),
        claim="exactly the weighted sum at λ = 1 (concatenated factors): should equal the naive sum at strengths 1"),
    Row("QR Merge of the plain LoRAs, interference removed", "lora", compose_qr_merge,
        ({"interference": "style without content directions"},),
        claim="QR-LoRA's authors: disentanglement alone does not guarantee a good merge"),
    Row("B-LoRA block split (composed)", "b-lora", compose_blocks, style_alone=style_block_alone,
        claim="ConsisLoRA Table 1 (SDXL): B-LoRA style CLIP 0.654, content DINO 0.536; ZipLoRA 0.643 / 0.488"),
    Row("ConsisLoRA (composed)", "consislora", compose_blocks, style_alone=style_block_alone,
        claim="ConsisLoRA Table 1 (SDXL): style CLIP 0.659, content DINO 0.629, above B-LoRA's 0.536 content"),
    Row("ConsisLoRA + Content-Style Guider", "consislora", compose_guider,
        tuple({"lambda": lam} for lam in (0.5, 1.0)), style_alone=style_block_alone,
        claim="ConsisLoRA: the guidance terms strengthen content and style beyond plain composition"),
    Row("QR-LoRA (trained ΔR) merged", "qr", compose_qr_merge, ({"interference": "off"},),
        claim="QR-LoRA: ΔR-only training disentangles so the merge keeps both (no numbers retrieved)"),
    Row("B4M make", "b4m", compose_b4m,
        claim="B4M: content and style in separate halves recombine without overwriting each other (numbers not "
              "retrieved)"),
    Row("B4M make + joint fine-tune", "b4m", compose_b4m, ({"fine_tune": True},),
        claim="B4M: the short joint fine-tune after Make repairs what the halves' recombination loses"),
    Row("Personalized Residual (content) + style LoRA, LAG off", "residual", compose_residual, ({"lag": False},),
        style_trainer="lora", claim="Personalized Residuals: LAG helps recontextualisation, can hurt other prompts"),
    Row("Personalized Residual (content) + style LoRA, LAG on", "residual", compose_residual, ({"lag": True},),
        style_trainer="lora", claim="Personalized Residuals: LAG changes only the concept's region"),
    Row("K-LoRA (training-free)", "lora", compose_klora, tuple({"pattern": p} for p in KLORA_BETA),
        claim="K-LoRA (CVPR 2025): beats ZipLoRA and B-LoRA on SDXL and FLUX, without training"),
    Row("ZipLoRA (merger vectors trained)", "lora", compose_ziplora,
        claim="ZipLoRA (ECCV 2024): keeps subject and style where the direct merge loses one"),
    Row("IPL style from a reference image (Image to Prompt Vectors)", not_yet="not measurable on the world: IPL needs "
        "a CLIP vision model sharing one image-text space with the text encoder; the world's CLIP-L is a seeded random "
        "text encoder and the only vision model here is an unrelated random ViT-L (600 MB, seconds per image), so a "
        "mapper trained by Train Prompt Mapper would align noise, and the world UNet never saw prompt vectors"),
]


def estimate_seconds(rows: list, args, cells: list | None = None, alone_cells: list | None = None) -> float:
    """Expected CPU seconds of a run (or of one shard's ``cells`` and ``alone_cells``) from the measured rates: every
    adapter the cells need (trainer x role x target x training seed) plus every picture (grid points on the composed
    prompt, then the recontextualisation, leakage and scene prompts at the chosen point; the guider's pictures cost
    GUIDED_FACTOR; then the style-alone leakage prompts once per way a style adapter is applied alone), scaled by the
    sampling steps. With --style-alone-only: the style adapters and the style-alone pictures only."""
    measured = [row for row in rows if not row.not_yet]
    cells = all_cells(args.pairs, range(args.seeds)) if cells is None else cells
    alone_cells = style_cells(args.pairs, range(args.seeds)) if alone_cells is None else alone_cells
    jobs = {(row.trainers[1], "style", style, seed) for row in measured for style, seed in alone_cells}
    pictures = 0.0
    if not args.style_alone_only:
        jobs |= {(trainer, role, pair[index], seed) for row in measured for pair, seed in cells
                 for index, (trainer, role) in enumerate(zip(row.trainers, ("content", "style")))}
        per_cell = sum((len(row.grid) + 2 * args.prompts + args.scene_prompts)
                       * (GUIDED_FACTOR if row.compose is compose_guider else 1) for row in measured)
        pictures = per_cell * args.sampling_seeds * len(cells)
    ways_alone = {(row.trainers[1], row.style_alone) for row in measured}
    pictures += len(ways_alone) * len(alone_cells) * args.leakage_shapes * args.sampling_seeds
    training = sum(STEP_SECONDS.get(job[0], 0.45) for job in jobs) * args.steps
    if not args.style_alone_only:  # the merges that train (ZipLoRA, B4M's fine-tune), per cell
        training += sum(merge_seconds(row, args) for row in measured) * len(cells)
    return training + pictures * PICTURE_SECONDS * args.sample_steps / 20 + JUDGE_SECONDS


def merge_seconds(row: Row, args) -> float:
    """Expected CPU seconds of the row's merge training per cell (ZipLoRA's vectors, B4M's joint fine-tune)."""
    if row.compose is compose_ziplora:
        return ZIPLORA_STEP_SECONDS * min(ZIPLORA_STEPS, args.steps)
    if row.compose is compose_b4m and row.grid[0].get("fine_tune"):
        return STEP_SECONDS["b4m"] * min(B4M_FINE_TUNE["steps"], args.steps)  # two picture sets per step, as B4M's runs
    return 0.0


# -- judging --------------------------------------------------------------------------------------------------------

class Judge:
    """The world evaluators plus the VAE-drawable style judgement: a linear probe, trained on VAE round trips of real
    pictures of all seven styles, over the style classifier's penultimate features and a colour histogram of the
    object's pixels. Its accuracy on fresh round trips is the 'drawable' ceiling (the strict evaluator's is 0% for
    zigzag and speckled)."""

    def __init__(self, vae, smoke: bool):
        from evaluators import load

        self.models, _ = load()
        train, test = (4, 2) if smoke else (48, 24)
        features = torch.cat([self.probe_features(self.round_trip(vae, style, 3000, train)) for style in STYLES])
        classes = torch.arange(len(STYLES)).repeat_interleave(train)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.probe = torch.nn.Linear(features.shape[1], len(STYLES))
        optimiser = torch.optim.Adam(self.probe.parameters(), lr=0.05)
        for _ in range(300):
            loss = (torch.nn.functional.cross_entropy(self.probe(features), classes)
                    + 1e-3 * self.probe.weight.pow(2).sum())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        fresh = {style: self.round_trip(vae, style, 5000, test) for style in (*HELD_OUT_STYLES, *BASE_STYLES)}
        self.ceiling = {style: {"strict": float(np.mean([s == style for s in self.labels(images)[1]])),
                                "drawable": float(np.mean([s == style for s in self.drawable(images)]))}
                        for style, images in fresh.items()}

    @staticmethod
    def round_trip(vae, style: str, first_seed: int, count: int) -> torch.Tensor:
        shapes = (*BASE_SHAPES, *HELD_OUT_SHAPES)
        images = torch.stack([torch.from_numpy(render(shapes[i % len(shapes)], style, first_seed + i).image)
                              for i in range(count)]).float() / 255
        with torch.no_grad():
            return vae.decode(vae.encode(images)).movedim(-1, 1).clamp(0, 1)

    @torch.no_grad()
    def probe_features(self, images: torch.Tensor) -> torch.Tensor:
        """The style classifier's penultimate features (unit length) beside a 4x4x4 colour histogram of the pixels
        further than 0.25 from the background (all pixels when none is)."""
        import torch.nn.functional as F

        style = self.models["style"]
        deep = F.normalize(style.head[:-1](style.features(F.avg_pool2d(images, 2) * 2 - 1)), dim=1)
        background = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
        histograms = []
        for picture in images.movedim(1, -1).reshape(images.shape[0], -1, 3):
            chosen = picture[(picture - background).abs().max(-1).values > 0.25]
            chosen = chosen if len(chosen) else picture
            bins = (chosen * 3.999).long().clamp(0, 3)
            counts = torch.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).float()
            histograms.append(counts / counts.sum())
        return torch.cat([deep, 2 * torch.stack(histograms)], dim=1)

    def labels(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        from evaluators import classify

        return classify(self.models, images)

    @torch.no_grad()
    def drawable(self, images: torch.Tensor) -> list[str]:
        return [STYLES[i] for i in self.probe(self.probe_features(images)).argmax(1)]


def background_change(pixels: np.ndarray) -> float:
    """Mean |pixel - background| (0..1) outside the estimated object: pixels further than 0.25 from the background
    colour (max over channels), dilated by 2 px."""
    difference = np.abs(pixels.astype(np.float32) - np.array(BACKGROUND, np.float32)) / 255
    obj = torch.from_numpy((difference.max(-1) > 0.25).astype(np.float32))[:, None]
    grown = torch.nn.functional.max_pool2d(obj, 5, stride=1, padding=2)[:, 0].numpy() > 0
    outside = ~grown
    return float(difference.mean(-1)[outside].mean()) if outside.any() else 1.0


def to_pixels(images: torch.Tensor) -> np.ndarray:
    return (images.movedim(1, -1).numpy() * 255).round().astype(np.uint8)


# -- the run --------------------------------------------------------------------------------------------------------

@dataclass
class Context:
    nodes: dict
    model: object
    clip: object
    vae: object
    judge: Judge
    args: argparse.Namespace
    cells: list  # this shard's ((shape, style), training seed) cells
    shard: int = 0
    shards: int = 1
    exchange_dir: Path | None = None  # where shards swap the figures every shard needs (the grid's composed hits)
    trained: dict = field(default_factory=dict)  # (trainer, role, target, seed) -> Trained
    alone: dict = field(default_factory=dict)  # (trainer, what is applied, style, seed) -> leakage entries
    b4m_auxiliary: object = None  # B4M's auxiliary Training Images, drawn once per run

    def adapter(self, trainer: str, role: str, target: str, seed: int) -> Trained:
        key = (trainer, role, target, seed)
        if key not in self.trained:
            started = time.time()
            self.trained[key] = TRAINERS[trainer](self, role, target, seed)
            log(f"trained {trainer} {role} {target} seed {seed}: {self.trained[key].cpu_seconds:.0f} CPU s, "
                f"{time.time() - started:.0f} s wall")
        return self.trained[key]

    def exchange(self, name: str, local: list[dict]) -> list[dict]:
        """Every shard's ``local`` lists (one dict of lists per grid point), joined in shard order: each shard writes
        its own and waits for the others', so that all choose the grid point one process would have chosen."""
        if self.shards == 1:
            return local
        write_json(self.exchange_dir / f"{name}.{self.shard}.json", local)
        paths = [self.exchange_dir / f"{name}.{k}.json" for k in range(self.shards)]
        while not all(path.exists() for path in paths):
            time.sleep(2)
        parts = [json.loads(path.read_text()) for path in paths]
        return [{key: [v for part in parts for v in part[i][key]] for key in point} for i, point in enumerate(local)]


def write_json(path: Path, value, indent: int | None = None) -> None:
    """Written whole or not at all (another process polls for it)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=indent))
    partial.replace(path)


def shard_cells(cells: list, shards: int) -> list[list]:
    """``cells`` (training-seed major, as all_cells orders them) in ``shards`` contiguous runs of near-equal length:
    contiguous, so that a shard keeps whole training seeds and few adapters are trained by two shards."""
    bounds = [round(k * len(cells) / shards) for k in range(shards + 1)]
    return [cells[a:b] for a, b in zip(bounds, bounds[1:])]


def all_cells(pairs: list, seeds) -> list:
    return [(pair, seed) for seed in seeds for pair in pairs]


def style_cells(pairs: list, seeds) -> list:
    """The style-alone cells: (held-out style, training seed), training-seed major (leakage needs no content)."""
    return [(style, seed) for seed in seeds for style in dict.fromkeys(pair[1] for pair in pairs)]


STARTED = time.time()
LOG_PREFIX = ""


def log(text: str) -> None:
    print(f"[{time.time() - STARTED:6.0f} s]{LOG_PREFIX} {text}", flush=True)


def judge_composed(ctx, images: torch.Tensor, shape: str, style: str, content_context: str | None = None,
                   style_context: str | None = None) -> dict:
    """Per image: the held-out shape (content), the held-out texture (drawable / strict style), both; in the entangled
    protocol also the leaks: the content reference's own style (drawable judgement) and the style reference's own
    shape drawn instead."""
    shapes, strict = ctx.judge.labels(images)
    drawable = ctx.judge.drawable(images)
    content = [s == shape for s in shapes]
    judged = {"content": content, "style": [s == style for s in drawable],
              "style_strict": [s == style for s in strict],
              "both": [c and s == style for c, s in zip(content, drawable)],
              "both_strict": [c and s == style for c, s in zip(content, strict)]}
    if content_context is not None:
        judged["content_leak_composed"] = [s == content_context for s in drawable]
        judged["style_leak_composed"] = [s == style_context for s in shapes]
    return judged


def recontext_styles(args, content_context: str | None) -> tuple[str, ...]:
    """The base styles of the recontextualisation prompts: the first --prompts, never the content reference's own."""
    return tuple(s for s in RECONTEXT_STYLES if s != content_context)[:args.prompts]


def leakage_shapes(count: int, style_context: str | None) -> tuple[str, ...]:
    """The base shapes of the leakage prompts: the first ``count``, never the style reference's own."""
    return tuple(s for s in LEAKAGE_SHAPES if s != style_context)[:count]


def case_of(target: str) -> str:
    """A content target's entangled case, as the table names it ('checkered x6'); '' when disentangled."""
    return f"{target.split(':')[1]} x{target.split(':')[2]}" if ":" in target else ""


def measure_row(ctx, row: Row) -> dict:
    """What one shard measures of one row over its cells (pair, training seed): the composed prompt at every grid point,
    the best point (chosen on every shard's composed pictures), then every measure at that point. The figures are
    raw (per image, per cell) so that shards can be merged; summarise() turns them into the row's result."""
    from evaluators import diversity, judge_regions

    args = ctx.args
    samplers, composed = {}, {}
    grid_hits = []
    for index, variant in enumerate(row.grid):
        for (shape, style), seed in ctx.cells:
            content = ctx.adapter(row.trainers[0], "content", shape, seed)
            styled = ctx.adapter(row.trainers[1], "style", style, seed)
            cpu = time.process_time()
            sample = row.compose(ctx, content, styled, variant)
            compose_cpu = time.process_time() - cpu  # merges that train (ZipLoRA, B4M's fine-tune) cost here
            started = time.process_time()
            images = sample(COMPOSED)
            elapsed = time.process_time() - started
            samplers[index, shape, style, seed] = sample
            composed[index, shape, style, seed] = (images, elapsed, compose_cpu)
        hits = [judge_composed(ctx, composed[index, s, t, seed][0], held_out(s), held_out(t)) for (s, t), seed in ctx.cells]
        grid_hits.append({key: [v for h in hits for v in h[key]] for key in ("both", "content")})
    grid_hits = ctx.exchange(f"row{ROWS.index(row)}", grid_hits)
    grid_scores = [(float(np.mean(h["both"])), float(np.mean(h["content"]))) for h in grid_hits]
    for variant, (both, content) in zip(row.grid, grid_scores):
        log(f"{row.name} {variant}: both right {both:.0%}, content {content:.0%}")
    best = max(range(len(row.grid)), key=lambda i: grid_scores[i])
    per_image = {k: [] for k in ("both", "content", "style", "both_strict", "style_strict", "recontext",
                                 "recontext_style", "leakage")}  # and "scene" where scenes are drawn
    per_cell = {k: [] for k in ("diversity", "background", "compose_cpu")}
    seconds, pictures, sheet = 0.0, 0, {}
    for (content_target, style_target), seed in ctx.cells:
        shape, style = held_out(content_target), held_out(style_target)
        content_context, style_context = reference_context(content_target), reference_context(style_target)
        images, elapsed, compose_cpu = composed[best, content_target, style_target, seed]
        seconds, pictures = seconds + elapsed, pictures + images.shape[0]
        judged = judge_composed(ctx, images, shape, style, content_context, style_context)
        case = case_of(content_target)
        if case:  # the headline per case (1 or N pictures, base or held-out style)
            judged[f"both@{case}"] = judged["both"]
        for key, values in judged.items():
            per_image.setdefault(key, []).append((seed, values))
        pixels = to_pixels(images)
        sheet[content_target, style_target, seed] = pixels
        per_cell["diversity"].append((seed, diversity(pixels)))
        per_cell["background"].append((seed, background_change(pixels)))
        per_cell["compose_cpu"].append((seed, compose_cpu))
        sample = samplers[best, content_target, style_target, seed]
        for base_style in recontext_styles(args, content_context):
            images = sample(f"a {base_style} {CONTENT_WORD}")
            shapes, styles = ctx.judge.labels(images)
            per_image["recontext"].append((seed, [a == shape and b == base_style for a, b in zip(shapes, styles)]))
            per_image["recontext_style"].append((seed, [b == base_style for b in styles]))
            if content_context is not None:  # the content reference's own style drawn in place of the prompted one
                per_image.setdefault("content_leak", []).append(
                    (seed, [b == content_context for b in ctx.judge.drawable(images)]))
        for base_shape in leakage_shapes(args.prompts, style_context):
            shapes, _ = ctx.judge.labels(sample(f"a {STYLE_WORD} {base_shape}"))
            per_image["leakage"].append((seed, [a == base_shape for a in shapes]))
        for second in SCENE_OBJECTS[:args.scene_prompts] if content_context is None else ():  # disentangled only
            judged = judge_regions(ctx.judge.models, to_pixels(sample(
                f"a {RECONTEXT_STYLES[0]} {CONTENT_WORD} and a {second[1]} {second[0]}", LANDSCAPE)))
            per_image.setdefault("scene", []).append((seed, [second in objects for objects in judged]))
    return {"row": row.name, "best": best, "grid_scores": grid_scores, "per_image": per_image, "per_cell": per_cell,
            "seconds": seconds, "pictures": pictures, "sheet": sheet}


def measure_style_alone(ctx, row: Row, variant: dict, cells: list) -> dict:
    """Leakage as issue 17 defines it, on this shard's style cells: 'a zkz <base shape>' for the first
    --leakage-shapes base shapes (never the entangled style reference's own), sampled with the row's style adapter
    alone (Row.style_alone, at the row's chosen point); per image, does the content evaluator still see the prompted
    base shape ('kept')? Entangled: does it see the style reference's own shape instead ('leak')? One entry
    (training seed, per sampling seed) per cell and shape. Rows applying the same style adapter the same way share
    the pictures."""
    entries = {"kept": [], "leak": []}
    for style, seed in cells:
        what, sample = row.style_alone(ctx, ctx.adapter(row.trainers[1], "style", style, seed), variant)
        key = (row.trainers[1], *what, style, seed)
        context = reference_context(style)
        if key not in ctx.alone:
            ctx.alone[key] = {"kept": [], "leak": []}
            for shape in leakage_shapes(ctx.args.leakage_shapes, context):
                shapes = ctx.judge.labels(sample(f"a {STYLE_WORD} {shape}"))[0]
                ctx.alone[key]["kept"].append((seed, [a == shape for a in shapes]))
                if context is not None:
                    ctx.alone[key]["leak"].append((seed, [a == context for a in shapes]))
        for part in entries:
            entries[part] += ctx.alone[key][part]
    return entries


def summarise(row: Row, measured: list[dict], trained: dict, seeds: list[int], pairs: list) -> dict:
    """The row's result from every shard's measure_row() figures and the training costs of every adapter
    ((trainer, role, target, seed) -> (CPU s, trainable parameters)): rates as mean ± spread over training seeds x
    sampling seeds, per-cell measures over cells, cost per pair (one content and one style adapter)."""
    first = measured[0]
    assert all(m["best"] == first["best"] for m in measured), f"{row.name}: shards chose different grid points"
    result = {"row": row.name, "chosen": row.grid[first["best"]],
              "grid": [{"variant": v, "both": s[0], "content": s[1]} for v, s in zip(row.grid, first["grid_scores"])],
              "sampling_seconds_per_image": sum(m["seconds"] for m in measured) / max(sum(m["pictures"] for m in measured), 1)}
    for key in dict.fromkeys(k for m in measured for k in m["per_image"]):  # a shard may hold no cell of a case
        result[key] = image_rate([e for m in measured for e in m["per_image"].get(key, [])], seeds)
    costs = {"cpu": [], "parameters": []}
    for seed in seeds:
        jobs = [(row.trainers[0], "content", shape, seed) for shape in sorted({p[0] for p in pairs})] + \
               [(row.trainers[1], "style", style, seed) for style in sorted({p[1] for p in pairs})]
        for index, key in enumerate(costs):
            costs[key].append(sum(trained[job][index] for job in jobs) / (len(jobs) / 2))
    values = {**{key: [v for m in measured for _, v in m["per_cell"][key]] for key in first["per_cell"]}, **costs}
    for key, entries in values.items():
        result[key] = {"mean": float(np.mean(entries)), "spread": float(np.std(entries))}
    result["sheet"] = {cell: pixels for m in measured for cell, pixels in m["sheet"].items()}
    return result


def image_rate(entries: list[tuple[int, list[bool]]], seeds) -> dict:
    """Mean and spread of a per-image rate: one cell per (training seed, sampling seed), averaged over prompts/pairs."""
    cells = []
    for seed in seeds:
        lists = [values for s, values in entries if s == seed]
        for column in range(len(lists[0]) if lists else 0):
            cells.append(float(np.mean([values[column] for values in lists])))
    return {"mean": float(np.mean(cells)) if cells else 0.0, "spread": float(np.std(cells)) if cells else 0.0}


# -- outputs --------------------------------------------------------------------------------------------------------

def fmt(measure: dict, percent: bool = True) -> str:
    if percent:
        return f"{measure['mean']:.0%} ± {measure['spread'] * 100:.0f}"
    return f"{measure['mean']:.3f} ± {measure['spread']:.3f}"


COLUMNS = ("method", "both right (drawable style)", "content", "style (drawable)", "both right (strict)",
           "recontextualisation", "leakage: base shape kept (style adapter alone)",
           "leakage with both adapters", "scene fidelity", "change outside object",
           "diversity", "training CPU s", "trainable parameters", "sampling CPU s / image", "vs naive (both right)")


ENTANGLED_COLUMNS = ("method", "both right (drawable style)", "both right per case", "content", "style (drawable)",
                     "content leak: reference's style in 'a <base style> sks'", "content leak in the composition",
                     "style leak: reference's shape in 'a zkz <base shape>' (style adapter alone)",
                     "style leak in the composition", "base shape kept (style adapter alone)", "recontextualisation",
                     "diversity", "training CPU s", "trainable parameters", "sampling CPU s / image",
                     "vs naive (both right)")


def training_cost(r: dict) -> str:
    """The row's training CPU s per pair, and the merge's own training (ZipLoRA, B4M's fine-tune) where it has one."""
    merge = r.get("compose_cpu", {"mean": 0.0})["mean"]
    return f"{r['cpu']['mean']:.0f} ± {r['cpu']['spread']:.0f}" + (f" + {merge:.0f} merge" if merge >= 1 else "")


def table_rows(results: list[dict], entangled: bool = False) -> list[tuple]:
    """One line per row of COLUMNS (ENTANGLED_COLUMNS for the entangled protocol's results)."""
    columns = ENTANGLED_COLUMNS if entangled else COLUMNS
    naive = next((r for r in results if r["row"] == NAIVE and "both" in r), None)
    rows = []
    for r in results:
        if "not_yet" in r:
            rows.append((r["row"], *["—"] * (len(columns) - 2), r["not_yet"]))
            continue
        name = r["row"] + (f" (best of {len(r['grid'])}: {describe(r['chosen'])})" if len(r["grid"]) > 1 else "")
        recontext = f"{fmt(r['recontext'])} (base style {r['recontext_style']['mean']:.0%})"
        alone = fmt(r["leakage_alone"]) if "leakage_alone" in r else "not measured"
        costs = (fmt(r["diversity"], False), training_cost(r), f"{r['parameters']['mean']:,.0f}",
                 f"{r['sampling_seconds_per_image']:.2f}", verdict(r, naive))
        if entangled:
            cases = ", ".join(f"{key.split('@', 1)[1]}: {r[key]['mean']:.0%}" for key in r if key.startswith("both@"))
            rows.append((name, fmt(r["both"]), cases, fmt(r["content"]), fmt(r["style"]), fmt(r["content_leak"]),
                         fmt(r["content_leak_composed"]), fmt(r["style_leak_alone"]), fmt(r["style_leak_composed"]),
                         alone, recontext, *costs))
            continue
        rows.append((name, fmt(r["both"]), fmt(r["content"]), fmt(r["style"]), fmt(r["both_strict"]), recontext,
                     alone, fmt(r["leakage"]), fmt(r["scene"]) if "scene" in r else "not measured",
                     fmt(r["background"], False), *costs))
    return rows


def describe(variant: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in variant.items())


def verdict(result: dict, naive: dict | None) -> str:
    if naive is None:
        return "no naive row in this run"
    if result is naive:
        return "the baseline"
    delta = (result["both"]["mean"] - naive["both"]["mean"]) * 100
    spread = max(result["both"]["spread"], naive["both"]["spread"]) * 100
    if delta > spread:
        return f"beats it by {delta:.0f} points (more than the spread {spread:.0f})"
    if delta > 0:
        return f"+{delta:.0f} points, within the spread ({spread:.0f}): not a clear win"
    return f"did NOT beat the naive sum ({'tie' if round(delta) == 0 else f'{delta:.0f} points'})"


def write_sheets(results: list[dict], args, folder: Path) -> list[Path]:
    """One contact sheet per measured row: rows pairs, columns training seed x sampling seed ('a zkz sks')."""
    from PIL import Image, ImageDraw

    written = []
    label = 250 if args.protocol == "entangled" else 110
    for r in results:
        if "sheet" not in r:
            continue
        lines = []
        for shape, style in args.pairs:
            strip = np.concatenate([np.pad(r["sheet"][shape, style, seed], ((0, 0), (1, 1), (1, 1), (0, 0)),
                                           constant_values=255) for seed in args.train_seeds], axis=0)
            lines.append(np.concatenate(list(strip), axis=1))
        width = max(line.shape[1] for line in lines)
        canvas = Image.new("RGB", (label + width, 16 + sum(line.shape[0] for line in lines)), "white")
        draw = ImageDraw.Draw(canvas)
        title = r["row"].replace("Δ", "delta ").replace("λ", "lambda ")
        draw.text((4, 2), f"{title}: '{COMPOSED}'; columns: training seeds x sampling seeds", fill="black")
        y = 16
        for (shape, style), line in zip(args.pairs, lines):
            canvas.paste(Image.fromarray(line), (label, y))
            draw.text((4, y + line.shape[0] // 2 - 6), f"{shape} x {style}", fill="black")
            y += line.shape[0]
        path = folder / f"{slug(r['row'])}.png"
        canvas.save(path)
        written.append(path)
    return written


def slug(name: str) -> str:
    return "".join(c if c.isascii() and c.isalnum() else "_" for c in name.lower()).strip("_")[:60]


CHARTS = (("both", "both right (drawable style)"), ("content", "content right"), ("recontext", "recontextualisation"),
          ("leakage_alone", "leakage: base shape kept, style adapter alone"),
          ("leakage", "leakage with both adapters: base shape kept"), ("scene", "scene fidelity: second object kept"),
          ("content_leak", "content leak: the reference's style in 'a <base style> sks'"),
          ("style_leak_alone", "style leak: the reference's shape, style adapter alone"))


def write_charts(results: list[dict], folder: Path) -> list[Path]:
    """Bar charts with error bars (one per measure); skipped with a message when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed in .venv: no bar charts (run --charts-only later to draw them)")
        return []
    measured = [r for r in results if "both" in r]
    written = []
    for key, title in CHARTS:
        if not all(key in r for r in measured):
            continue
        figure, axis = plt.subplots(figsize=(8, 3.6))
        names = [r["row"] for r in measured]
        axis.bar(range(len(names)), [r[key]["mean"] * 100 for r in measured],
                 yerr=[r[key]["spread"] * 100 for r in measured], capsize=3, color="#4c72b0")
        naive = next((r for r in measured if r["row"] == NAIVE), None)
        if naive is not None:
            axis.axhline(naive[key]["mean"] * 100, color="grey", linestyle="--", linewidth=1, label="naive sum")
            axis.legend(fontsize=7, loc="upper right")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        axis.set_ylabel("% of pictures")
        axis.set_ylim(0, 105)
        axis.set_title(f"{title} (mean ± std over training x sampling seeds)", fontsize=9)
        figure.tight_layout()
        path = folder / f"chart_{key}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (0..N-1)")
    parser.add_argument("--steps", type=int, default=250, help="optimiser steps per adapter, batch 4, every trainer")
    parser.add_argument("--per-pair", type=int, default=6, help="training pictures per (shape, style) pair")
    parser.add_argument("--sampling-seeds", type=int, default=4, help="pictures per prompt (one batch)")
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=1, help="base styles (recontextualisation) and base shapes "
                        "(leakage) used, the first N of RECONTEXT_STYLES / LEAKAGE_SHAPES")
    parser.add_argument("--leakage-shapes", type=int, default=len(LEAKAGE_SHAPES), help="base shapes of the "
                        "style-alone leakage, the first N of LEAKAGE_SHAPES")
    parser.add_argument("--style-alone-only", action="store_true", help="measure only the style-alone leakage (the "
                        "style adapters retrained) and add it to the run in <out>/results.json")
    parser.add_argument("--scene-prompts", type=int, default=1, help="second objects (scene fidelity) used, the first "
                        "N of SCENE_OBJECTS")
    parser.add_argument("--pairs", type=int, default=len(PAIRS), help="the first N held-out pairs")
    parser.add_argument("--protocol", choices=("disentangled", "entangled"), default="disentangled", help="disentangled: "
                        "each adapter learns from pictures that already separate content from style (the shape in "
                        "every base style, the texture on every base shape); entangled (the papers' setting): from "
                        "pictures of one style / one shape each (--cases)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="entangled: the references per held-out pair, "
                        "<context>:<pictures>, context 'base' (the shape in checkered) or 'held-out' (in the pair's "
                        f"other held-out style); the style reference is the texture on a {ENTANGLED_STYLE_SHAPE}")
    parser.add_argument("--only", default="", help="comma-separated row numbers (1-based) or name fragments")
    parser.add_argument("--workers", type=int, default=2, help="processes sharing the cells (one thread each; the "
                        "figures are those of one process)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--charts-only", action="store_true", help="redraw the charts from <out>/results.json")
    parser.add_argument("--estimate", action="store_true", help="print the expected CPU time of these settings, exit")
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)  # a worker's: its index
    parser.add_argument("--exchange", type=Path, default=None, help=argparse.SUPPRESS)  # a worker's: shared folder
    args = parse_args(parser, {"seeds": 1, "steps": 2, "per_pair": 1, "sampling_seeds": 2, "sample_steps": 2,
                               "prompts": 1, "leakage_shapes": 1, "pairs": 2})
    entangled = args.protocol == "entangled"
    if harness.SMOKE and entangled:
        args.pairs, args.cases = 1, "base:1,held-out:1"
    if entangled and args.out == OUT:
        args.out = OUT / "entangled"
    if harness.SMOKE and args.out in (OUT, OUT / "entangled"):  # a smoke run never writes the committed figures
        args.out = Path(tempfile.mkdtemp(prefix="csa-benchmark-smoke-"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.charts_only:
        write_charts(json.loads((args.out / "results.json").read_text())["rows"], args.out)
        return
    torch.set_num_threads(1)
    args.train_seeds = list(range(args.seeds))
    args.pairs = PAIRS[:args.pairs]
    if entangled:
        args.pairs = entangled_pairs(args.pairs, parse_cases(args.cases))
    chosen = [row for i, row in enumerate(ROWS, 1)
              if not args.only or any(o == str(i) or (not o.isdigit() and o.lower() in row.name.lower())
                                      for o in args.only.split(","))]
    cells = all_cells(args.pairs, args.train_seeds)
    args.workers = max(1, min(args.workers, len(cells)))
    shards = shard_cells(cells, args.workers)
    per_worker = [estimate_seconds(chosen, args, c, a)
                  for c, a in zip(shards, shard_cells(style_cells(args.pairs, args.train_seeds), args.workers))]
    if args.estimate:
        print(f"about {sum(per_worker) / 3600:.2f} CPU hours on one thread of the machine measured "
              f"({estimate_seconds(chosen, args) / 3600:.2f} in one process); the longest of {args.workers} workers "
              f"about {max(per_worker) / 3600:.2f} hours")
        return
    if args.shard is not None:
        run_shard(chosen, args, shards, args.shard, args.exchange)
        return
    exchange = Path(tempfile.mkdtemp(prefix="csa-benchmark-shards-"))
    log(f"{len(cells)} cells on {args.workers} worker(s); expected about "
        f"{max(per_worker) / 60:.0f} minutes on one free core each")
    if args.workers == 1:
        run_shard(chosen, args, shards, 0, exchange)
    else:
        run_workers(args.workers, exchange)
    merge(chosen, args, exchange)
    shutil.rmtree(exchange)  # kept when a worker or the merge failed, for a look at what the workers wrote


def run_workers(count: int, exchange: Path) -> None:
    """This script ``count`` times as workers (--shard k), each on its own cells; stops them all when one fails."""
    import subprocess

    workers = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--shard", str(k), "--exchange",
                                 str(exchange)]) for k in range(count)]
    try:
        while True:
            codes = [worker.poll() for worker in workers]
            failed = [k for k, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                raise SystemExit(f"benchmark worker(s) {failed} failed (exit {codes[failed[0]]}); their output is above")
            if all(code == 0 for code in codes):
                return
            time.sleep(2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()


def run_shard(chosen: list, args, shards: list, shard: int, exchange: Path) -> None:
    """One worker: train and measure every chosen row on its cells; write its figures (shard-<k>.json, pictures in
    shard-<k>.npz) into ``exchange`` for merge()."""
    global LOG_PREFIX
    LOG_PREFIX = f" [worker {shard + 1}/{len(shards)}]" if len(shards) > 1 else ""
    nodes, _ = harness.start_comfy()
    import comfy.sd
    from evaluate import WORLD_CHECKPOINT

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(WORLD_CHECKPOINT))
    ctx = Context(nodes, model, clip, vae, Judge(vae, harness.SMOKE), args, shards[shard], shard, len(shards), exchange)
    log(f"judge ready; VAE round-trip ceilings {ctx.judge.ceiling}; cells {ctx.cells}")
    alone_cells = shard_cells(style_cells(args.pairs, args.train_seeds), len(shards))[shard]
    log(f"expected about {estimate_seconds(chosen, args, ctx.cells, alone_cells) / 60:.0f} CPU minutes (measured rates)")
    measured, alone, pictures, cpu = {}, {}, {}, time.process_time()
    chosen_before = previous_choices(args) if args.style_alone_only else {}
    for index, row in enumerate(ROWS):
        if row not in chosen or row.not_yet:
            continue
        started, cpu_started = time.time(), time.process_time()
        if args.style_alone_only:
            variant = chosen_before[row.name]
        else:
            figures = measure_row(ctx, row)
            pictures.update({f"{index}|{shape}|{style}|{seed}": pixels
                             for (shape, style, seed), pixels in figures.pop("sheet").items()})
            measured[index] = figures
            variant = row.grid[figures["best"]]
        alone[index] = measure_style_alone(ctx, row, variant, alone_cells)
        log(f"{row.name}: measured in {time.process_time() - cpu_started:.0f} CPU s, {time.time() - started:.0f} s "
            f"wall (training included when first needed)")
    trained = {"|".join(map(str, key)): [t.cpu_seconds, t.parameters, t.fingerprint] for key, t in ctx.trained.items()}
    np.savez_compressed(exchange / f"shard-{shard}.npz", **pictures)
    write_json(exchange / f"shard-{shard}.json", {"measured": measured, "alone": alone, "trained": trained,
                                                  "ceiling": ctx.judge.ceiling, "cpu": time.process_time() - cpu})


def previous_choices(args) -> dict:
    """--style-alone-only: each row's chosen grid point in the run recorded in <out>/results.json."""
    path = args.out / "results.json"
    if not path.exists():
        raise SystemExit(f"--style-alone-only adds the style-alone leakage to an earlier run: {path} does not exist")
    recorded = json.loads(path.read_text())
    if recorded["settings"]["training_seeds"] != args.train_seeds or recorded["settings"]["steps"] != args.steps:
        raise SystemExit(f"--style-alone-only: {path} was run with training seeds {recorded['settings']['training_seeds']}"
                         f" and {recorded['settings']['steps']} steps; pass the same --seeds / --steps")
    return {r["row"]: r["chosen"] for r in recorded["rows"] if "chosen" in r}


def merge(chosen: list, args, exchange: Path) -> None:
    """Every worker's figures as one run's: the rows' results, contact sheets, charts, results.json, the table."""
    parts = [json.loads((exchange / f"shard-{k}.json").read_text()) for k in range(args.workers)]
    trained = {}
    for part in parts:
        for key, cost in part["trained"].items():
            trainer, role, target, seed = key.split("|")
            trained.setdefault((trainer, role, target, int(seed)), cost)
            assert trained[trainer, role, target, int(seed)][2] == cost[2], f"{key}: two workers trained it differently"
    leakage_alone, style_leak_alone = ({index: image_rate([e for part in parts
                                                           for e in part["alone"].get(str(index), {}).get(kind, [])],
                                                          args.train_seeds) for index, row in enumerate(ROWS) if row in chosen}
                                       for kind in ("kept", "leak"))
    fingerprints = {"|".join(map(str, key)): cost[2] for key, cost in sorted(trained.items())}
    if args.style_alone_only:
        add_style_alone(chosen, args, leakage_alone, style_leak_alone, fingerprints, sum(part["cpu"] for part in parts))
        return
    for k, part in enumerate(parts):
        with np.load(exchange / f"shard-{k}.npz") as pictures:
            for name in pictures.files:
                index, shape, style, seed = name.split("|")
                part["measured"][index].setdefault("sheet", {})[shape, style, int(seed)] = pictures[name]
    results = []
    for index, row in enumerate(ROWS):
        if row not in chosen:
            continue
        if row.not_yet:
            results.append({"row": row.name, "not_yet": row.not_yet})
            continue
        results.append({**summarise(row, [part["measured"][str(index)] for part in parts], trained, args.train_seeds,
                                    args.pairs), "leakage_alone": leakage_alone[index],
                        **({"style_leak_alone": style_leak_alone[index]} if args.protocol == "entangled" else {})})
    missing = [row.name for row in chosen if not any(r["row"] == row.name for r in results)]
    assert not missing, f"rows not produced: {missing}"
    log(f"rows produced: {len(results)} of {len(chosen)} ({sum('not_yet' in r for r in results)} marked not yet)")
    sheets = write_sheets(results, args, args.out)
    charts = write_charts(results, args.out)
    serialisable = [{k: v for k, v in r.items() if k != "sheet"} for r in results]
    ceiling = parts[0]["ceiling"]
    write_json(args.out / "results.json", {"rows": serialisable, "ceiling": ceiling, "settings": settings(args),
                                           "cpu_seconds": sum(part["cpu"] for part in parts),
                                           "fingerprints": fingerprints}, indent=1)
    record_table(results, ceiling, args, sum(part["cpu"] for part in parts), sheets, charts)


def add_style_alone(chosen: list, args, leakage_alone: dict, style_leak_alone: dict, fingerprints: dict,
                    cpu: float) -> None:
    """--style-alone-only: the style-alone leakage added to the run in <out>/results.json (its rows, chosen points,
    contact sheets kept), with this pass's adapter fingerprints and cost beside it; charts and table redrawn."""
    path = args.out / "results.json"
    recorded = json.loads(path.read_text())
    for index, row in enumerate(ROWS):
        if row in chosen and not row.not_yet:
            entry = next(r for r in recorded["rows"] if r["row"] == row.name)
            entry["leakage_alone"] = leakage_alone[index]
            if args.protocol == "entangled":
                entry["style_leak_alone"] = style_leak_alone[index]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    recorded["style_alone_pass"] = {"when": stamp, "cpu_seconds": cpu, "settings": settings(args),
                                    "fingerprints": fingerprints}
    write_json(path, recorded, indent=1)
    charts = write_charts(recorded["rows"], args.out)
    sheets = [args.out / f"{slug(r['row'])}.png" for r in recorded["rows"] if "chosen" in r]
    previous = recorded["settings"]
    args.prompts, args.scene_prompts = previous["prompts"], previous.get("scene_prompts", 1)
    record_table(recorded["rows"], recorded["ceiling"], args, recorded.get("cpu_seconds"), sheets, charts, preface=(
        f"The run recorded in {relative(path)} with its style-alone leakage added by a separate pass ({stamp}, "
        f"`--style-alone-only`, {cpu:.0f} CPU s): the style adapters retrained with the same trainers, pictures, "
        f"steps and seeds (training is deterministic; their fingerprints are in results.json), every other figure "
        f"as first recorded. "))


def settings(args) -> dict:
    return {"pairs": [list(p) for p in args.pairs], "training_seeds": args.train_seeds, "steps": args.steps,
            "batch": 4, "per_pair": args.per_pair, "sampling_seeds": args.sampling_seeds,
            "sample_steps": args.sample_steps, "prompts": args.prompts, "scene_prompts": args.scene_prompts,
            "leakage_shapes": args.leakage_shapes, "workers": args.workers, "protocol": args.protocol,
            "recipes": RECORDED_RECIPES}


def record_table(results, ceiling: dict, args, cpu: float, sheets, charts, preface: str = "") -> None:
    entangled = args.protocol == "entangled"
    rows = table_rows(results, entangled)
    if entangled:
        data = (f"Entangled references (the papers' setting): per held-out pair and case, the content adapter learns "
                f"from N pictures of the held-out shape in one style (case 'checkered xN': a base style; the other "
                f"held-out style otherwise), captioned 'a {CONTENT_WORD}', and the style adapter from N pictures of the "
                f"held-out texture on a {ENTANGLED_STYLE_SHAPE}, captioned 'a {STYLE_WORD}' (B-LoRA / ConsisLoRA's "
                f"'A [v]'; the world has no class word). Cases (content x style targets): "
                f"{', '.join(f'{a} x {b}' for a, b in args.pairs)}. Content leak: the content reference's own style "
                f"(drawable judgement) in 'a <base style> {CONTENT_WORD}' and in the composition; style leak: the style "
                f"reference's {ENTANGLED_STYLE_SHAPE} drawn for 'a {STYLE_WORD} <base shape>' (style adapter alone, as "
                f"the row applies it) and in the composition (instead of the held-out shape). ")
        prompts = (f"Recontextualisation: 'a <base style> {CONTENT_WORD}', the first {args.prompts} of "
                   f"{', '.join(RECONTEXT_STYLES)} that is not the reference's own style; leakage prompts: the first "
                   f"{args.leakage_shapes} (style adapter alone) / {args.prompts} (composed) of "
                   f"{', '.join(LEAKAGE_SHAPES)} other than {ENTANGLED_STYLE_SHAPE}. ")
    else:
        data = (f"Pairs {', '.join(f'{a} x {b}' for a, b in args.pairs)}; every adapter learns from {args.per_pair} "
                f"pictures per (shape, style) (content: the shape in the {len(BASE_STYLES)} base styles; style: the "
                f"texture on the {len(BASE_SHAPES)} base shapes). ")
        prompts = (f"Recontextualisation: 'a <base style> {CONTENT_WORD}' drawn as the held-out shape in that base "
                   f"style (in brackets: the base style alone), base styles {', '.join(RECONTEXT_STYLES[:args.prompts])}"
                   f"; leakage: 'a {STYLE_WORD} <base shape>' keeps its base shape, with the style adapter alone (as "
                   f"the row applies it; base shapes {', '.join(LEAKAGE_SHAPES[:args.leakage_shapes])}; once per "
                   f"held-out style x training seed) and with both adapters (base shapes "
                   f"{', '.join(LEAKAGE_SHAPES[:args.prompts])}); scene fidelity: 'a {RECONTEXT_STYLES[0]} "
                   f"{CONTENT_WORD} and a <style> <shape>' keeps the second object ("
                   f"{', '.join(f'{b} {a}' for a, b in SCENE_OBJECTS[:args.scene_prompts])}) in its own region. ")
    notes = preface + data + (
        f"Training seeds {args.train_seeds}; every adapter {args.steps} steps x batch 4; ranks, "
        f"learning rates and schedules {RECORDED_RECIPES} (residual rank: 5% of the channels). Sampling: Euler "
        f"{args.sample_steps} steps, CFG {SAMPLING['cfg']}, "
        f"{args.sampling_seeds} pictures per prompt (seed {SAMPLING['seed']}, one batch). Rates are shares of "
        f"pictures, mean ± std over training seeds x sampling seeds (in points); change outside object, diversity and "
        f"training time: ± std over training seeds. " + prompts + "Training CPU s and parameters: the content and the "
        f"style adapter of a pair together; '+ merge': the merge's own training per pair (ZipLoRA's vectors, B4M's "
        f"joint fine-tune of {B4M_FINE_TUNE['steps']} steps at most).\n\n"
        f"Style ceilings (world VAE round trip of real pictures): strict evaluator "
        + ", ".join(f"{s} {c['strict']:.0%}" for s, c in ceiling.items() if s in HELD_OUT_STYLES)
        + "; the drawable-style judgement on fresh round trips "
        + ", ".join(f"{s} {c['drawable']:.0%}" for s, c in ceiling.items()) + ". "
        "Grid rows were chosen on the measured pictures (optimistic for them). Where a row did not beat the naive sum "
        "the last column says so.\n\n" + paper_notes(results) +
        f"\n\nContact sheets: {', '.join(relative(p) for p in sheets)}. "
        + (f"Charts: {', '.join(relative(p) for p in charts)}. " if charts else
           "No charts: matplotlib is not installed in .venv (`--charts-only` draws them from results.json). ")
        + (f"{cpu:.0f} CPU s in all." if cpu is not None else ""))
    title = (f"entangled references, one style / one shape each ({len({held_out(a) + held_out(b) for a, b in args.pairs})}"
             f" pairs x {len(args.pairs) // max(len({held_out(a) + held_out(b) for a, b in args.pairs}), 1)} cases"
             if entangled else f"held-out content x style, disentangled data ({len(args.pairs)} pairs")
    record(f"Method benchmark on the world: {title} x {len(args.train_seeds)} training seeds)", rows, notes=notes,
           columns=ENTANGLED_COLUMNS if entangled else COLUMNS)


def relative(path: Path) -> str:
    try:
        return path.relative_to(harness.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


def paper_notes(results) -> str:
    claims = {row.name: row.claim for row in ROWS}
    return "Papers' claims beside these rows:\n\n" + "\n".join(
        f"- {r['row']}: {claims.get(r['row']) or '—'}" for r in results if "not_yet" not in r)


if __name__ == "__main__":
    main()
