"""How well the world base model obeys its prompts, draws two objects, and where its words' attention lands.

    .venv/bin/python bench/world/evaluate.py [--seeds 4] [--steps 20] [--pairs 30] [--attention-seeds 2] [--parts a,b,c]

Everything goes through ComfyUI's own loader, KSampler and VAE, and the pack's Apply Localized Residual:
(a) prompt forms x samplers: every base caption in five phrasings (the last never used in training), sampled with
    Euler / normal at CFG 4 and dpmpp_2m / karras at CFG 6; cells: content / style / both right;
(b) two-object scenes: "a <style> <shape> and a <style> <shape>" on the wide canvas the world draws two objects on
    (world.render_wide_scene: 128 wide x 64 high for even-numbered pairs, 64 wide x 128 high for odd ones); right when
    each object, judged in its own region, is one of the two prompted (shape, style) pairs and together they are both;
    also what went wrong (shapes right, styles right, one shape drawn twice), and the ceiling: the same pairs rendered
    by the world and judged as drawn and after a round trip through the checkpoint's VAE; --square-scenes adds the
    same prompts at 64x64, where two objects must share an 8x8 latent;
(c) attention (two-object prompts on the wide canvas too): the concept (shape) word's LAG masks per block (median
    threshold, the node's default; top 20%; top 10%) with a zero residual, so nothing changes in the picture: the share
    of the mask on the named object, on the other object (two-object prompts), and its IoU with the named object, at
    the last step and over all steps. The object is the drawn one (the generated picture's foreground), so the measure
    needs no ground truth the model did not draw.
Records a table in bench/RESULTS.md and writes the contact sheets bench/world/generations.png (form x sampler
rows for the first caption of each shape) and bench/world/two_objects.png.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from evaluators import box_around, classify, diversity, foreground, judge_regions, load, regions_judged  # noqa: E402
import harness  # noqa: E402
from harness import comfy_host, parse_args, record  # noqa: E402  (puts scripts/ on the path)
from model_names import WORLD_CHECKPOINT_NAME  # noqa: E402
from world import (BASE_SHAPES, BASE_STYLES, HELD_OUT_FORM, LANDSCAPE, PORTRAIT, SQUARE, phrase, phrase_two,  # noqa: E402
                   render_scene, render_wide_scene)

WORLD_CHECKPOINT = comfy_host.TINY_MODELS_DIR / WORLD_CHECKPOINT_NAME
SAMPLERS = {"Euler / normal, CFG 4": ("euler", "normal", 4.0), "dpmpp_2m / karras, CFG 6": ("dpmpp_2m", "karras", 6.0)}
TABLE_FORMS = ("a <style> <shape>", "no article", "with a pattern", "plain background", *HELD_OUT_FORM)
LOCALIZED_RESIDUAL_STATE = "csa.localized_residual"  # nodes/localized_residual.py STATE_KEY
# The node's default (half of the positions) and tighter settings a user can choose (a fifth, a tenth of them). A mask
# of half the positions can lie on an object of area A at most 2A: on the world's objects (A about 0.29) a median mask
# cannot reach a 70% share however well the attention finds the object, so the tighter masks are measured too.
THRESHOLDS = {"median": ("median", 0.5), "top 20%": ("top-k percent", 20.0), "top 10%": ("top-k percent", 10.0)}
MASK_FRACTION = {"median": 0.5, "top 20%": 0.2, "top 10%": 0.1}
PARTS = ("a", "b", "c")


def sample_caption(model, clip, vae, text: str, seeds: int, steps: int, cfg: float, seed: int,
                   sampler: str = "euler", scheduler: str = "normal", positive=None, size=SQUARE) -> torch.Tensor:
    """(seeds, 3, height, width) images in [0, 1] for one caption, through ComfyUI's KSampler; size: (height, width)."""
    import nodes

    positive = positive if positive is not None else harness.encode_prompt(clip, text)
    negative = harness.encode_prompt(clip, "")
    latent = {"samples": torch.zeros(seeds, 4, size[0] // 8, size[1] // 8)}
    samples = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)[0]
    with torch.no_grad():
        return vae.decode(samples["samples"]).movedim(-1, 1).clamp(0, 1)


def to_pixels(images: torch.Tensor) -> np.ndarray:
    return (images.movedim(1, -1).numpy() * 255).round().astype(np.uint8)


def canvas(index: int) -> tuple[int, int]:
    """The wide canvas (height, width) of the index-th two-object prompt: landscape and portrait in turn."""
    return LANDSCAPE if index % 2 == 0 else PORTRAIT


def sheet_row(pixels: np.ndarray, width: int) -> np.ndarray:
    """Pictures side by side, padded with white on the right to ``width`` pixels."""
    row = np.concatenate(list(pixels), axis=1)
    return np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)


def two_object_pairs(count: int, seed: int = 5) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``count`` prompts of two base objects with different shapes and different styles, deterministic."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        shapes, styles = rng.choice(len(BASE_SHAPES), 2, replace=False), rng.choice(len(BASE_STYLES), 2, replace=False)
        pairs.append(((BASE_SHAPES[shapes[0]], BASE_STYLES[styles[0]]), (BASE_SHAPES[shapes[1]], BASE_STYLES[styles[1]])))
    return pairs


def prompt_forms(model, clip, vae, evaluators, args) -> tuple[list[tuple], list[np.ndarray]]:
    """Table (a): rows (form, sampler, content, style, both, diversity); and contact-sheet rows."""
    rows, sheet = [], []
    pairs = [(shape, style) for shape in BASE_SHAPES for style in BASE_STYLES][:args.captions]
    for form in TABLE_FORMS:
        for sampler_name, (sampler, scheduler, cfg) in SAMPLERS.items():
            content, style, spreads = [], [], []
            for index, (shape, style_word) in enumerate(pairs):
                images = sample_caption(model, clip, vae, phrase(shape, style_word, form), args.seeds, args.steps, cfg,
                                        args.seed, sampler, scheduler)
                shapes, styles = classify(evaluators, images)
                content += [s == shape for s in shapes]
                style += [s == style_word for s in styles]
                pixels = to_pixels(images)
                spreads.append(diversity(pixels))
                if index % len(BASE_STYLES) == 0:
                    sheet.append(np.concatenate(list(pixels), axis=1))
            both = float(np.mean([a and b for a, b in zip(content, style)]))
            rows.append((form, sampler_name, float(np.mean(content)), float(np.mean(style)), both, float(np.mean(spreads))))
            print(f"(a) {form} | {sampler_name}: content {rows[-1][2]:.0%} style {rows[-1][3]:.0%} both {both:.0%}",
                  flush=True)
    return rows, sheet


def two_object_scores(judged: list[list[tuple[str, str]]], prompted: list[tuple]) -> dict[str, float]:
    """(b)'s rate and what went wrong: per picture, the (shape, style) judged in each region against the prompted pair."""
    def shares(picture, pair, part):
        return len(picture) == 2 and sorted(o[part] for o in picture) == sorted(o[part] for o in pair)

    return {"both right": float(np.mean([sorted(j) == sorted(p) for j, p in zip(judged, prompted)])),
            "shapes right": float(np.mean([shares(j, p, 0) for j, p in zip(judged, prompted)])),
            "styles right": float(np.mean([shares(j, p, 1) for j, p in zip(judged, prompted)])),
            "same shape twice": float(np.mean([len(j) == 2 and j[0][0] == j[1][0] for j in judged]))}


def two_objects(model, clip, vae, evaluators, args, square: bool = False) -> tuple[dict[str, dict], list[str], np.ndarray]:
    """(b): per sampler, two_object_scores of every picture (on the wide canvas, or at 64x64 with ``square``); notes;
    a sheet of the Euler pictures."""
    scores, notes, sheet = {}, [], []
    for sampler_name, (sampler, scheduler, cfg) in SAMPLERS.items():
        judged_all, prompted = [], []
        for index, (first, second) in enumerate(two_object_pairs(args.pairs)):
            text = phrase_two(first, second, "a <style> <shape> and a <style> <shape>")
            size = SQUARE if square else canvas(index)
            images = sample_caption(model, clip, vae, text, args.seeds, args.steps, cfg, args.seed, sampler, scheduler,
                                    size=size)
            pixels = to_pixels(images)
            judged = judge_regions(evaluators, pixels)
            judged_all += judged
            prompted += [(first, second)] * len(judged)
            if sampler == "euler":
                sheet.append(sheet_row(pixels, args.seeds * max(LANDSCAPE[1], PORTRAIT[1])))
                notes.append(f"{text} ({size[1]}x{size[0]}): "
                             f"{['; '.join(f'{a} {b}' for b, a in j) or 'no objects' for j in judged]}")
        scores[sampler_name] = two_object_scores(judged_all, prompted)
        print(f"(b) two objects{' at 64x64' if square else ''} | {sampler_name}: {scores[sampler_name]}", flush=True)
    return scores, notes, np.concatenate(sheet, axis=0)


def two_object_ceiling(vae, evaluators, args, square: bool = False) -> dict[str, dict]:
    """(b)'s ceiling: the same pairs on the same canvases rendered by the world (seeds args.seed + k), judged as drawn
    and after a round trip through the checkpoint's VAE. A UNet whose latents were perfect could score no better than
    the round trip."""
    scores = {}
    for images, prompted in rendered_pairs(args, square):
        drawn = torch.from_numpy(images).float() / 255.0
        with torch.no_grad():
            round_trip = vae.decode(vae.encode(drawn)).clamp(0, 1)
        for kind, pictures in (("rendered scenes", images), ("their VAE round trips", to_pixels(round_trip.movedim(-1, 1)))):
            scores.setdefault(kind, []).append((judge_regions(evaluators, pictures), prompted))
    return {kind: two_object_scores([j for judged, _ in parts for j in judged], [p for _, ps in parts for p in ps])
            for kind, parts in scores.items()}


def rendered_pairs(args, square: bool) -> list[tuple[np.ndarray, list]]:
    """(uint8 pictures, prompted pairs) of (b)'s pairs as the world draws them, one entry per canvas size."""
    groups: dict[tuple, tuple[list, list]] = {}
    for index, pair in enumerate(two_object_pairs(args.pairs)):
        size = SQUARE if square else canvas(index)
        for k in range(args.seeds):
            scene = render_scene(pair, args.seed + k) if square else render_wide_scene(pair, args.seed + k, size == LANDSCAPE)
            groups.setdefault(size, ([], []))[0].append(scene.image)
            groups[size][1].append(scene.objects)
    return [(np.stack(images), prompted) for images, prompted in groups.values()]


def object_masks(pixels: np.ndarray, shape_word: str, other_word: str | None, evaluators):
    """(named object, other object or None) pixel masks of one generated picture, or None when the picture does not
    show the named shape where the evaluators can find it."""
    from scipy.ndimage import binary_closing

    if other_word is None:
        return binary_closing(foreground(pixels), np.ones((5, 5), bool)), None
    judged = regions_judged(evaluators, pixels)
    shapes = [shape for _, shape, _ in judged]
    if len(judged) < 2 or shapes.count(shape_word) != 1 or other_word not in shapes:
        return None
    named = shapes.index(shape_word)
    closed = [binary_closing(r, np.ones((5, 5), bool)) & box_around(r, 0) for r, _, _ in judged]
    return closed[named], closed[1 - named]


def attention(nodes, model, clip, vae, evaluators, args) -> tuple[list[tuple], dict[str, int]]:
    """(c): per (prompt kind, block, step set): share of the concept word's mask on the named object, on the other
    object, IoU with the named object, the named object's area; and how many pictures were judged."""
    import nodes as comfy_nodes

    residual = nodes["CSA_NewResidualAdapter"].execute(model=model, rank_fraction=0.05, init_scale=0.0, seed=0).args[0]
    negative = harness.encode_prompt(clip, "")
    prompts = [("one object", phrase(shape, style, "a <style> <shape>"), shape, None, SQUARE)
               for shape in BASE_SHAPES for style in BASE_STYLES][:args.captions]
    prompts += [("two objects", phrase_two(a, b, "a <style> <shape> and a <style> <shape>"), a[0], b[0], canvas(index))
                for index, (a, b) in enumerate(two_object_pairs(args.pairs))]
    sums: dict[tuple, list[np.ndarray]] = {}
    counted = {"one object": 0, "two objects": 0}
    for (kind, text, word, other, size), (threshold_name, (mode, value)) in itertools.product(prompts, THRESHOLDS.items()):
        patched, positive = nodes["CSA_ApplyLocalizedResidual"].execute(
            model=model, residual=residual, clip=clip, prompt=text, concept_words=word, lag=True,
            threshold_mode=mode, threshold=value, start_percent=0.0, end_percent=1.0, strength=1.0).args[:2]
        latent = {"samples": torch.zeros(args.attention_seeds, 4, size[0] // 8, size[1] // 8)}
        samples = comfy_nodes.common_ksampler(patched, args.seed, args.steps, 4.0, "euler", "normal", positive, negative,
                                              latent)[0]
        with torch.no_grad():
            pixels = to_pixels(vae.decode(samples["samples"]).movedim(-1, 1).clamp(0, 1))
        recorded = patched.model_options["transformer_options"][LOCALIZED_RESIDUAL_STATE].recorded
        last = min(recorded)
        for i, picture in enumerate(pixels):
            masks = object_masks(picture, word, other, evaluators)
            if masks is None:
                continue
            counted[kind] += threshold_name == "median"
            named, second = masks
            for block in recorded[last]:
                for steps_name, sigmas in (("last step", [last]), ("all steps", list(recorded))):
                    values = []
                    for sigma in sigmas:
                        lag = recorded[sigma][block][i].float()[None, None]
                        lag = torch.nn.functional.interpolate(lag, size=named.shape, mode="nearest")[0, 0].numpy() > 0.5
                        on_named, on_other = (lag & named).sum(), (lag & second).sum() if second is not None else 0
                        values.append((on_named / max(1, lag.sum()), on_other / max(1, lag.sum()),
                                       on_named / max(1, (lag | named).sum()), named.mean()))
                    sums.setdefault((kind, threshold_name, ".".join(map(str, block)), steps_name), []).append(
                        np.mean(values, axis=0))
    rows = [(*key, *np.mean(values, axis=0)) for key, values in sorted(sums.items())]
    for row in rows:
        print(f"(c) {row[0]} | {row[1]} | {row[2]} | {row[3]}: on named {row[4]:.2f}, on other {row[5]:.2f}, "
              f"IoU {row[6]:.2f}, object area {row[7]:.2f}", flush=True)
    return rows, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=len(BASE_SHAPES) * len(BASE_STYLES),
                        help="how many base captions (in order)")
    parser.add_argument("--pairs", type=int, default=30, help="two-object prompts")
    parser.add_argument("--attention-seeds", type=int, default=2)
    parser.add_argument("--square-scenes", action="store_true",
                        help="(b) also at 64x64, both objects in one 8x8 latent (the world's earlier two-object scenes)")
    parser.add_argument("--checkpoint", type=Path, default=WORLD_CHECKPOINT)
    parser.add_argument("--parts", default=",".join(PARTS), help="which of (a) prompt forms, (b) two objects, "
                        "(c) attention to run, e.g. 'c'")
    args = parse_args(parser, {"seeds": 1, "steps": 2, "captions": 2, "pairs": 2, "attention_seeds": 1})
    nodes, _ = harness.start_comfy()
    import comfy.sd
    from PIL import Image

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(args.checkpoint))
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts takes a comma list of {', '.join(PARTS)}, got {args.parts!r}")
    evaluators, metadata = load()
    started = time.time()
    table, sheet = prompt_forms(model, clip, vae, evaluators, args) if "a" in parts else ([], [])
    two, two_notes, two_sheet = two_objects(model, clip, vae, evaluators, args) if "b" in parts else ({}, [], None)
    two.update(two_object_ceiling(vae, evaluators, args) if "b" in parts else {})
    square = {}
    if "b" in parts and args.square_scenes:
        square = two_objects(model, clip, vae, evaluators, args, square=True)[0]
        square.update(two_object_ceiling(vae, evaluators, args, square=True))
    attention_rows, counted = (attention(nodes, model, clip, vae, evaluators, args) if "c" in parts else
                               ([], {"one object": 0, "two objects": 0}))
    if not harness.SMOKE and "a" in parts:
        Image.fromarray(np.concatenate(sheet, axis=0)).save(HERE / "generations.png")
    if not harness.SMOKE and "b" in parts:
        Image.fromarray(two_sheet).save(HERE / "two_objects.png")
    images = args.captions * args.seeds
    rows = [(f"(a) {form} · {sampler}", f"content {c:.1%}, style {s:.1%}, **both {b:.1%}**, diversity {d:.3f}")
            for form, sampler, c, s, b, d in table]
    rows += [(f"(b) two objects{where}, each right in its region · {name}",
              f"**{score['both right']:.1%}** of {args.pairs * args.seeds} (shapes right {score['shapes right']:.1%}, "
              f"styles right {score['styles right']:.1%}, one shape drawn twice {score['same shape twice']:.1%})")
             for where, scores in (("", two), (" at 64x64", square)) for name, score in scores.items()]
    rows += [(f"(c) {kind} · {threshold} · block {block} · {steps}",
              f"on the named object **{named:.2f}**, on the other {other:.2f}, IoU {iou:.2f} (object area {area:.2f}, "
              f"so at most {min(1.0, area / MASK_FRACTION[threshold]):.2f} can lie on it)")
             for kind, threshold, block, steps, named, other, iou, area in attention_rows]
    rows += [("evaluators' held-out accuracy on generator images",
              ", ".join(f"{k[len('accuracy.'):]} {v}" for k, v in sorted(metadata.items()) if k.startswith("accuracy."))),
             ("sampling", f"{args.steps} steps; one object 64x64, two objects 128x64 and 64x128 in turn; "
                          f"{time.time() - started:.0f} s in all; {args.checkpoint.name}")]
    title = {"a": "prompt forms", "b": "two objects", "c": "attention"}
    record(f"World base model: {', '.join(title[p] for p in parts)}"
           + (f" ({images} images per cell of (a))" if "a" in parts else ""), rows, notes=(
        (f"(a) every one of {args.captions} base captions x {args.seeds} seeds per cell; the form "
         f"'{next(iter(HELD_OUT_FORM))}' was never used in training. " if "a" in parts else "")
        + ("(b) on the wide canvas (128x64 for even-numbered pairs, 64x128 for odd ones); shapes / styles right: the two "
           "judged shapes (styles) are the two prompted, whatever their pairing; the rendered scenes and their VAE round "
           "trips are the same pairs on the same canvases drawn by the world itself, the ceiling a UNet could reach "
           "through this VAE. " if "b" in parts else "")
        + ("(c) LAG masks of the shape word with a zero residual: a median mask is half of the latent positions, a "
           "top-20% mask a fifth, a top-10% mask a tenth, so the share on an object can reach at most the object's area "
           f"divided by that; pictures judged: {counted['one object']} one-object, {counted['two objects']} two-object "
           "(those where the evaluators found the named shape), each under every threshold." if "c" in parts else "")
        + ("\n\nTwo-object pictures, Euler:\n\n" + "\n".join(f"- {n}" for n in two_notes) if two_notes else "")))


if __name__ == "__main__":
    main()
