"""Train the B4M and Personalized Residual world demo adapters with the pack's nodes, and judge them.

    .venv/bin/python bench/world/train_b4m_residual_demos.py [--only b4m,residual] [--steps N]

B4M's stages can run side by side, one core each, then Make from their saved files:

    ... --only b4m_content & ... --only b4m_style & wait; ... --only b4m_make

The sibling of train_demo_adapters.py (same pictures, prompts, sampler and evaluators):

- B4M: a content run on the held-out shape 'star' ('a <style> sks'; auxiliary data: the zigzag pictures) and a style
  run on the held-out style 'zigzag' ('a zkz <shape>'; auxiliary data: the star pictures), one seed, then B4M Make
  with its joint fine-tune on both picture sets (RECIPES["b4m_make"]).
  Bars: star in >= 80% of 'a <base style> sks' (content run), zigzag in >= 80% of 'a zkz <base shape>' (style run;
  ceiling: the world VAE's round trip of zigzag, recorded by train_demo_adapters.py). The made adapter is judged on
  both prompts.
- Personalized Residual on the star pictures captioned as the paper's 'a photo of a V* <class>': 'a <style> sks
  <class>', applied with Apply Localized Residual (concept words 'sks <class>', the identifier and the class word) with
  LAG on and off. The world has no superclass word for its shapes, so the class word is a base shape the model draws
  (RECIPES: 'diamond', what the base model draws for 'a <style> sks'; 'cross' gave 60% star with LAG, bench/RESULTS.md):
  the star share of 'a <base style> sks diamond' (bar 80% with LAG) and the mean change outside the object against
  the base model's picture of the same prompt and seed (evaluators.change_outside_mask; the object is every pixel
  farther than 40 levels from the world's plain background in either picture): LAG should change less.

Files go to bench/world/adapters/ in fp16. Time is the training's process CPU time (the machine is shared).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from harness import record  # noqa: E402
from train_demo_adapters import (ADAPTERS, CONTENT_WORD, SAMPLING, demo_arguments, judged, role_pictures, training_data,  # noqa: E402
                                 training_options, with_overrides, world_session)
from model_names import WORLD_DEMO_ADAPTERS, WORLD_DEMO_B4M_MADE, WORLD_DEMO_RESIDUAL_CLASS  # noqa: E402  (scripts/ is on the path through harness)
from world import BACKGROUND, BASE_STYLES  # noqa: E402

# lr: the main factor's (B4M: the auxiliary factor at a tenth of it, as the official 1e-4 / 1e-5). The committed B4M
# demo (DEMO_B4M_RECIPE, "b4m_rank64"): the official rank 64 on every linear layer with orthonormal halves on the
# non-square layers too (orthogonal_non_square); content 3000 steps at 5e-3 (85% star on seeds 3000..3007, where it was
# chosen; 82% on the fresh 4000..4007), style 800 steps at 1e-3 (100% zigzag on 3000..3007, where it was chosen, and on
# 4000..4007). "b4m" (--b4m-recipe b4m --out DIR; the method benchmark's B4M): rank 8 on the attention projections, the
# paper's layers; on seeds 3000..3007 content 0% star, style 98% zigzag (bench/RESULTS.md "B4M at rank 64 on every
# linear layer" and "B4M demo at rank 64")
RECIPES = {"b4m": {"steps": 210, "lr": 5e-3, "rank": 8, "schedule": "cosine", "per_pair": 6,
                   "targets": "attention projections", "loss": "epsilon", "non_square": False},
           # per-run entries ("content" / "style") override the recipe's steps and lr for that run; Make needs only the
           # runs' layers, ranks and seed to agree
           "b4m_rank64": {"steps": 3000, "lr": 5e-3, "rank": 64, "schedule": "cosine", "per_pair": 6,
                          "targets": "all linear", "loss": "epsilon", "non_square": True,
                          "style": {"steps": 800, "lr": 1e-3}},
           # Make's joint fine-tune on both picture sets, for the rank-64 demo runs: 400 steps at 3e-4 draw star 48% and
           # zigzag 48% on seeds 4000..4007, where it was chosen (1e-4: 8% / 56%; 1e-3: 72% / 0%; Make alone 2% / 0%;
           # bench/RESULTS.md "B4M demo at rank 64")
           "b4m_make": {"steps": 400, "lr": 3e-4, "schedule": "cosine", "per_pair": 6},
           # residual: 1500 steps on 12 pictures per pair, chosen on seeds 2000..2007 (LAG on 82%) and judged on the
           # untouched 3000..3007 (88%); 600 steps on 6 gave 57.5% on fresh seeds (bench/RESULTS.md)
           "residual": {"steps": 1500, "lr": 6e-3, "schedule": "cosine", "per_pair": 12, "token_lr": 0.0,
                        "class_word": WORLD_DEMO_RESIDUAL_CLASS}}


def data_node(nodes, kind: str, per_pair: int):
    """Training Images of the held-out star (content) or zigzag (style), as the other demo adapters train on."""
    return training_data(nodes, "content" if kind == "star" else "style", kind, per_pair)


def residual_data(nodes, per_pair: int, class_word: str):
    """The star pictures captioned 'a <style> sks <class_word>' (the paper's 'a V* <class>' with the world's style)."""
    images, captions = role_pictures("content", "star", per_pair)
    return nodes["CSA_TrainingImages"].execute(
        images=images, captions="\n".join(f"{c} {class_word}" for c in captions), image_folder="", repeats=1,
        resolution=64, trigger_word=CONTENT_WORD).args[0]


def timed(run):
    cpu, wall, load = time.process_time(), time.time(), os.getloadavg()[0]
    result = run()
    return result, f"{time.process_time() - cpu:.0f} CPU s, {time.time() - wall:.0f} s wall (load {load:.1f})"


def keep(path: str, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out / Path(path).name)
    return f"{(out / Path(path).name).stat().st_size / 1024:.0f} KiB"


DEMO_B4M_RECIPE = "b4m_rank64"  # the recipe of the committed B4M demo files
B4M_STAGES = ("b4m_content", "b4m_style", "b4m_make")


B4M_RUN_FILES = dict(zip(("star", "zigzag"), WORLD_DEMO_ADAPTERS["b4m"]))  # the content and style runs' file names


def run_recipe(name: str, run: str, args) -> dict:
    """RECIPES[name] for the B4M ``run`` ('content' / 'style'): its per-run steps and lr, then the command line's."""
    recipe = RECIPES[name]
    return with_overrides({**recipe, **recipe.get(run, {})}, args)


def b4m_runs(nodes, model, clip, vae, evaluators, args, rows, notes, stages, star, zigzag) -> dict:
    """Train and judge the content and / or style run (``stages``) on the star / zigzag Training Images;
    {'content' | 'style': adapter}."""
    runs = {}
    for run, main, aux, kind in (("content", star, zigzag, "star"), ("style", zigzag, star, "zigzag")):
        if f"b4m_{run}" not in stages:
            continue
        recipe = run_recipe(args.b4m_recipe, run, args)
        steps, lr = recipe["steps"], recipe["lr"]
        node = nodes["CSA_TrainB4MContent" if run == "content" else "CSA_TrainB4MStyle"]
        outputs, cost = timed(lambda: node.execute(
            model=model, clip=clip, vae=vae, data=main, auxiliary_data=aux, targets=recipe["targets"],
            blocks="", rank=recipe["rank"], steps=steps, lr=lr, lr_auxiliary=lr / 10, orthogonal_init=True,
            loss=recipe["loss"], seed=0, filename=Path(B4M_RUN_FILES[kind]).stem, overwrite=True, resume_from="none",
            options=training_options(nodes, schedule=recipe["schedule"]),
            orthogonal_non_square=recipe["non_square"]).args)
        runs[run] = outputs[0]
        size = keep(outputs[-1], args.out)
        share, labels = judged(nodes, model, clip, vae, outputs[0], kind, evaluators, args)
        rows.append((f"csa_world_b4m_{kind} (B4M {run} run)", f"{share:.0%} {kind} ({'pass' if share >= 0.8 else 'FAIL'}"
                     f" at 80%); {cost}; {size}"))
        notes.append(f"- csa_world_b4m_{kind}: " + "; ".join(labels))
        print(rows[-1], flush=True)
    return runs


def saved_run(nodes, kind: str, out: Path):
    """A run an earlier process of this script saved to ``out``, through Load Adapter as a user would load it."""
    import folder_paths

    source = out / B4M_RUN_FILES[kind]
    if not source.is_file():
        raise SystemExit(f"b4m_make: {source} is missing; train it first with --only b4m_content / b4m_style")
    # a name of its own: the session's loras folder links the committed demo files, and a copy onto a link would
    # write through to them
    loaded = f"saved_run_{source.name}"
    shutil.copyfile(source, Path(folder_paths.get_folder_paths("loras")[0]) / loaded)
    return nodes["CSA_LoadAdapter"].execute(adapter_name=loaded, strength=1.0, part="whole file",
                                            role="from file").args[0]


def b4m_demos(nodes, model, clip, vae, evaluators, args, rows, notes, stages):
    """The runs in ``stages``, then (with 'b4m_make') B4M Make of this process's runs or the saved ones; the stages
    can run in separate processes side by side, each on one core."""
    per_pair = with_overrides(RECIPES[args.b4m_recipe], args)["per_pair"]
    star, zigzag = data_node(nodes, "star", per_pair), data_node(nodes, "zigzag", per_pair)
    runs = b4m_runs(nodes, model, clip, vae, evaluators, args, rows, notes, stages, star, zigzag)
    if "b4m_make" not in stages:
        return
    for run, kind in (("content", "star"), ("style", "zigzag")):
        runs[run] = runs[run] if run in runs else saved_run(nodes, kind, args.out)
    fine_tune = with_overrides(RECIPES["b4m_make"], args)
    (made, *_, path), cost = timed(lambda: nodes["CSA_B4MMake"].execute(
        content_run=runs["content"], style_run=runs["style"], model=model, clip=clip, vae=vae, content_data=star,
        style_data=zigzag, steps=fine_tune["steps"], lr=fine_tune["lr"], preconditioned=True, reg=1e-4,
        loss="epsilon", seed=0, filename=Path(WORLD_DEMO_B4M_MADE).stem, overwrite=True,
        options=training_options(nodes, schedule=fine_tune["schedule"])).args)
    size = keep(path, args.out)
    for kind in ("star", "zigzag"):
        share, labels = judged(nodes, model, clip, vae, made, kind, evaluators, args)
        how = f" + {fine_tune['steps']}-step joint fine-tune" if fine_tune["steps"] else ", no fine-tune"
        rows.append((f"csa_world_b4m_made (B4M Make{how}) on the {kind} prompts",
                     f"{share:.0%} {kind}; {cost}; {size}"))
        notes.append(f"- csa_world_b4m_made, {kind} prompts: " + "; ".join(labels))
        print(rows[-1], flush=True)


def object_pixels(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64) bool: pixels farther than 40 levels (any channel) from the world's plain background."""
    return (np.abs(images.astype(np.int32) - np.array(BACKGROUND)).max(-1) > 40)


def residual_demo(nodes, model, clip, vae, evaluators, args, rows, notes):
    recipe = with_overrides(RECIPES["residual"], args)
    outputs, cost = timed(lambda: nodes["CSA_TrainPersonalizedResidual"].execute(
        model=model, clip=clip, vae=vae, data=residual_data(nodes, recipe["per_pair"], recipe["class_word"]),
        identifier=CONTENT_WORD, class_word=recipe["class_word"], caption="", rank_fraction=0.05, steps=recipe["steps"],
        lr=recipe["lr"], loss="epsilon", seed=0, filename="csa_world_residual_star", overwrite=True, resume_from="none",
        options=training_options(nodes, schedule=recipe["schedule"]), learn_token_embedding=recipe["token_lr"] > 0,
        token_lr=recipe["token_lr"] or recipe["lr"]).args)
    rows_judged, notes_judged = judge_residual(nodes, model, clip, vae, evaluators, outputs[0], recipe["class_word"], args,
                                               f"{cost}; {keep(outputs[-1], args.out)}")
    rows += rows_judged
    notes += notes_judged
    print(*rows[-2:], sep="\n", flush=True)


def judge_residual(nodes, model, clip, vae, evaluators, residual, class_word: str, args, cost: str = "") -> tuple:
    """The residual star through Apply Localized Residual with LAG on and off: (rows, notes) with the star share of
    'a <base style> sks <class_word>' and the change outside the object against the base model's picture."""
    from evaluate import sample_caption
    from evaluators import change_outside_mask, classify

    rows, notes = [], []
    concept = f"{CONTENT_WORD} {class_word}"
    prompts = [f"a {style} {concept}" for style in BASE_STYLES][:args.prompts]

    def draw(patched, prompt, positive=None):
        images = sample_caption(patched, clip, vae, prompt, args.seeds, args.sample_steps, SAMPLING["cfg"],
                                args.judge_seed, positive=positive)
        return images, (images.movedim(1, -1).numpy() * 255).round().astype(np.uint8)

    results = {}
    for lag in (True, False):
        hits, changes, labels = [], [], []
        for prompt in prompts:
            patched, positive = nodes["CSA_ApplyLocalizedResidual"].execute(
                model=model, residual=residual, clip=clip, prompt=prompt, concept_words=concept, lag=lag,
                threshold_mode="median", threshold=0.5, start_percent=0.0, end_percent=1.0, strength=1.0).args[:2]
            images, pixels = draw(patched, prompt, positive)
            _, base = draw(model, prompt)
            shapes = classify(evaluators, images)[0]
            hits += [s == "star" for s in shapes]
            mask = object_pixels(pixels) | object_pixels(base)
            changes += [change_outside_mask(pixels[i], base[i], mask[i]) for i in range(len(pixels))]
            labels.append(f"'{prompt}': {', '.join(shapes)}")
        results[lag] = (float(np.mean(hits)), float(np.mean(changes)))
        notes.append(f"- csa_world_residual_star, LAG {'on' if lag else 'off'}: " + "; ".join(labels))
    (on_share, on_change), (off_share, off_change) = results[True], results[False]
    rows.append(("csa_world_residual_star (Personalized Residual) with LAG",
                 f"{on_share:.0%} star ({'pass' if on_share >= 0.8 else 'FAIL'} at 80%); change outside the object "
                 f"{on_change:.4f}" + (f"; {cost}" if cost else "")))
    rows.append(("csa_world_residual_star without LAG", f"{off_share:.0%} star; change outside the object "
                 f"{off_change:.4f} (LAG {'changes less: pass' if on_change < off_change else 'does not change less: FAIL'})"))
    return rows, notes


def main() -> None:
    args = demo_arguments(__doc__.splitlines()[0], "comma-separated: b4m (its three stages), b4m_content, b4m_style, "
                          "b4m_make, residual", "b4m,residual", extra_arguments=lambda parser: parser.add_argument(
                              "--b4m-recipe", default=DEMO_B4M_RECIPE, choices=("b4m", "b4m_rank64"),
                              help=f"the B4M runs' recipe (RECIPES; other than the demo's '{DEMO_B4M_RECIPE}': give "
                                   "--out)"))
    if args.b4m_recipe != DEMO_B4M_RECIPE and args.out == ADAPTERS:
        raise SystemExit(f"--b4m-recipe {args.b4m_recipe} is not the committed demo's recipe: give --out, a folder other "
                         f"than {ADAPTERS}")
    chosen = [stage for part in args.only.split(",") for stage in (B4M_STAGES if part == "b4m" else (part,))]
    unknown = sorted(set(chosen) - {*B4M_STAGES, "residual"})
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {', '.join(unknown)}; choose from b4m, {', '.join(B4M_STAGES)}, "
                         "residual")
    nodes, model, clip, vae, evaluators = world_session()
    rows, notes = [], []
    if set(chosen) & set(B4M_STAGES):
        b4m_demos(nodes, model, clip, vae, evaluators, args, rows, notes, chosen)
    if "residual" in chosen:
        residual_demo(nodes, model, clip, vae, evaluators, args, rows, notes)
    b4m, res = with_overrides(RECIPES[args.b4m_recipe], args), with_overrides(RECIPES["residual"], args)
    mk = with_overrides(RECIPES["b4m_make"], args)
    runs_trained = [run for run in ("content", "style") if f"b4m_{run}" in chosen]
    per_run = {run: run_recipe(args.b4m_recipe, run, args) for run in ("content", "style")}
    described = {  # only what this run trained
        "b4m_runs": f"B4M {' and '.join(runs_trained) or 'content and style'} run"
                    f"{'s' if len(runs_trained) != 1 else ''}{'' if runs_trained else ' (saved earlier)'}: "
                    f"{b4m['targets']}, rank {b4m['rank']}, orthonormal halves "
                    f"{'on every layer' if b4m['non_square'] else 'on square layers only'}, {b4m['loss']} loss, "
                    + ", ".join(f"{run} {r['steps']} steps at lr {r['lr']}" for run, r in per_run.items()
                                if not runs_trained or run in runs_trained)
                    + f" ({b4m['schedule']}; auxiliary factor at a tenth), seed 0, "
                    "auxiliary data the other kind's pictures",
        "b4m_make": (f"B4M Make with the joint fine-tune on both picture sets, {mk['steps']} steps at lr {mk['lr']} "
                     f"({mk['schedule']}), preconditioned (λ 1e-4), ε loss" if mk["steps"] else
                     "B4M Make without the joint fine-tune"),
        "residual": f"Personalized Residual: every proj_out, rank 5% of the channels, ε loss, {res['steps']} steps at lr "
                    f"{res['lr']} ({res['schedule']}) on {res['per_pair']} pictures per pair, captions 'a <style> "
                    f"{CONTENT_WORD} {res['class_word']}', concept words '{CONTENT_WORD} {res['class_word']}', median "
                    f"threshold"}
    record("World demo adapters: B4M and Personalized Residual", rows, notes=(
        "; ".join(text for part, text in described.items()
                  if part in chosen or (part == "b4m_runs" and set(chosen) & set(B4M_STAGES)))
        + ". Batch 4, AdamW (weight decay 0.01, "
        f"clip 1.0), fp16 files. Judged with Euler {args.sample_steps} steps, CFG {SAMPLING['cfg']}, seeds "
        f"{args.judge_seed}..{args.judge_seed + args.seeds - 1}. Labels per prompt:\n\n" + "\n".join(notes)))


if __name__ == "__main__":
    main()
