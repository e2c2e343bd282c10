"""Train the committed demo adapters on the world model with the pack's own trainer nodes, and judge them.

    .venv/bin/python bench/world/train_demo_adapters.py [--only lora-star,qr-zigzag] [--steps 400]

Two adapters per method (plain LoRA, ConsisLoRA, QR-LoRA), each learned from world generator pictures:

- content: the held-out shape 'star' in every base style, captioned 'a <style> sks';
- style: the held-out style 'zigzag' on every base shape, captioned 'a zkz <shape>' (its trigger word 'zkz').

Each is saved in fp16 to bench/world/adapters/ and judged by the world evaluators: 'a <base style> sks' must
give a star (4 seeds x 5 styles), 'a zkz <base shape>' a zigzag fill (4 seeds x 6 shapes); bar 80%. The
zigzag bar has a ceiling: the world VAE's own round trip of zigzag pictures, measured and recorded beside it.
Time per adapter is the training's process CPU time (the machine is shared; wall time is recorded too).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import harness  # noqa: E402
from harness import parse_args, record  # noqa: E402
from world import BASE_SHAPES, BASE_STYLES, render  # noqa: E402

ADAPTERS = HERE / "adapters"
CONTENT_WORD, STYLE_WORD = "sks", "zkz"
SAMPLING = {"seed": 1000, "steps": 20, "cfg": 4.0}
# Per method: optimiser steps, learning rate and its schedule, rank, training pictures per (shape, style) pair
# (ConsisLoRA: lr is the x0 rate, the ε rate is twice it, as in the official 2e-4 / 1e-4). Chosen on the retrained world
# within the 3-CPU-minute budget (bench/RESULTS.md): there a constant 3e-3 made the LoRA loss climb again after 200
# steps, and QR-LoRA at 5e-3 (its earlier recipe) raised the loss within 3 steps; QR-LoRA's ΔR needs the official rank 64.
# ConsisLoRA: the official rank 64 on the world's halves block split; at 7e-4 the star fell to 25%, at 5e-4 it held.
RECIPES = {"lora": {"steps": 380, "lr": 1.5e-3, "schedule": "cosine", "rank": 8, "per_pair": 6},
           "qr": {"steps": 400, "lr": 5e-4, "schedule": "constant", "rank": 64, "per_pair": 12},
           "consislora": {"steps": 700, "lr": 5e-4, "schedule": "constant", "rank": 64, "per_pair": 12}}


@dataclass(frozen=True)
class Demo:
    method: str  # lora, consislora, qr
    kind: str  # star (content) or zigzag (style)
    settings: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"csa_world_{self.method}_{self.kind}"


DEMOS = [Demo(method, kind) for method in ("lora", "consislora", "qr") for kind in ("star", "zigzag")]


def role_pictures(role: str, target: str, per_pair: int, first_seed: int = 500) -> tuple[torch.Tensor, list[str]]:
    """A content target (a shape) in every base style, captioned 'a <style> {trigger}', or a style target (a texture)
    on every base shape, captioned 'a {trigger} <shape>'."""
    pairs = [(target, style) for style in BASE_STYLES] if role == "content" else [(s, target) for s in BASE_SHAPES]
    samples = [render(shape, style, first_seed + i) for shape, style in pairs for i in range(per_pair)]
    captions = [f"a {s.style} {{trigger}}" if role == "content" else f"a {{trigger}} {s.shape}" for s in samples]
    return torch.from_numpy(np.stack([s.image for s in samples])).float() / 255, captions


def training_data(nodes, role: str, target: str, per_pair: int):
    """Training Images for a content (trigger 'sks') or style (trigger 'zkz') target."""
    images, captions = role_pictures(role, target, per_pair)
    return nodes["CSA_TrainingImages"].execute(
        images=images, captions="\n".join(captions), image_folder="", repeats=1, resolution=64,
        trigger_word=CONTENT_WORD if role == "content" else STYLE_WORD).args[0]


def training_options(nodes, batch_size: int = 4, precision: str = "fp16", schedule: str = "constant"):
    return nodes["CSA_TrainingOptions"].execute(
        batch_size=batch_size, accumulation=1, schedule=schedule, warmup_steps=0, weight_decay=0.01, grad_clip=1.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision=precision).args[0]


def run_trainer(nodes, model, clip, vae, method: str, role: str, data, options, steps: int, lr: float, seed: int = 0,
                filename: str = "", rank: int = 8) -> tuple:
    """One of the pack's trainer nodes on world data: method lora / qr (every linear layer, v loss), consislora
    (the world block split; content mode: ε loss then x0 from a third of the run; style mode: half the steps, then a
    fresh style block with x0 loss) or b-lora (ConsisLoRA's B-LoRA mode, ε loss at 2 lr, both blocks). Returns the
    node's outputs."""
    common = {"model": model, "clip": clip, "vae": vae, "data": data, "seed": seed, "filename": filename,
              "overwrite": bool(filename), "resume_from": "none", "options": options}
    if method == "lora":
        return nodes["CSA_TrainAdapter"].execute(targets="all linear", blocks="", rank=rank, alpha=float(rank),
                                                 steps=steps, lr=lr, loss="v", role=role, **common).args
    if method == "qr":
        return nodes["CSA_TrainQRLoRA"].execute(targets="all linear", blocks="", rank=rank, steps=steps, lr=lr,
                                                loss="v", role=role, **common).args
    mode = "b-lora" if method == "b-lora" else role
    first = steps // 2 if mode == "style" else steps
    return nodes["CSA_TrainConsisLoRA"].execute(
        mode=mode, block_split="world", content_blocks="", style_blocks="", rank=rank, alpha=float(rank), steps=first,
        switch_step=first // 3 if mode != "b-lora" else first, lr_epsilon=2 * lr, lr_x0=lr,
        style_steps=steps - first, style_lr=lr, style_noise_offset=0.03, **common).args


def with_overrides(recipe: dict, args) -> dict:
    """``recipe`` with the command line's --steps / --lr / --schedule / --per-pair applied (0 or '': the recipe's
    own)."""
    return {**recipe, "steps": args.steps or recipe["steps"], "lr": args.lr or recipe["lr"],
            "schedule": args.schedule or recipe["schedule"], "per_pair": args.per_pair or recipe["per_pair"]}


def train(nodes, model, clip, vae, demo: Demo, args):
    role = "content" if demo.kind == "star" else "style"
    recipe = with_overrides(RECIPES[demo.method], args)
    data = training_data(nodes, role, demo.kind, recipe["per_pair"])
    return run_trainer(nodes, model, clip, vae, demo.method, role, data,
                       training_options(nodes, schedule=recipe["schedule"]), recipe["steps"], recipe["lr"],
                       filename=demo.name, rank=recipe["rank"])


def judged(nodes, model, clip, vae, adapter, kind: str, evaluators, args) -> tuple[float, list[str]]:
    """Share of samples the evaluators label as the trained shape / style, and the labels per prompt."""
    from evaluate import sample_caption
    from evaluators import classify

    patched = nodes["CSA_ApplyAdapters"].execute(model=model, adapter=adapter, block_strengths="").args[0]
    prompts = ([f"a {style} {CONTENT_WORD}" for style in BASE_STYLES] if kind == "star" else
               [f"a {STYLE_WORD} {shape}" for shape in BASE_SHAPES])[:args.prompts]
    hits, notes = [], []
    for prompt in prompts:
        images = sample_caption(patched, clip, vae, prompt, args.seeds, args.sample_steps, SAMPLING["cfg"],
                                args.judge_seed)
        shapes, styles = classify(evaluators, images)
        labels = shapes if kind == "star" else styles
        hits += [label == kind for label in labels]
        notes.append(f"'{prompt}': {', '.join(labels)}")
    return float(np.mean(hits)), notes


def loss_summary(adapter_path: str, window: int = 100) -> str:
    """Mean training loss per ``window`` steps, from the training state saved beside the adapter."""
    import json

    from safetensors import safe_open

    with safe_open(str(Path(adapter_path).with_suffix(".optimizer-state")), "pt") as handle:
        metadata = handle.metadata()
    losses = [v for stage in json.loads(metadata["csa.recipe"])["earlier_losses"] for v in stage]
    losses += json.loads(metadata["csa.losses"])
    return ", ".join(f"{np.mean(losses[i:i + window]):.4f}" for i in range(0, len(losses), window))


def vae_ceiling(vae, evaluators) -> float:
    """How often the world VAE's round trip of real zigzag pictures is still labelled zigzag."""
    from evaluators import classify

    images = torch.stack([torch.from_numpy(render(shape, "zigzag", 900 + i).image) for shape in BASE_SHAPES
                          for i in range(4)]).float() / 255
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(images)).movedim(-1, 1).clamp(0, 1)
    return float(np.mean([s == "zigzag" for s in classify(evaluators, round_trip)[1]]))


def demo_arguments(description: str, only_help: str, only_default: str = "", extra_arguments=None) -> argparse.Namespace:
    """The options every world demo-adapter script shares (what to train, training size, judging, where the files
    go), parsed; a smoke run trains 2 steps, judges one prompt and writes to a scratch folder (or --out)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--only", default=only_default, help=only_help)
    parser.add_argument("--steps", type=int, default=0, help="override every method's steps (0: RECIPES)")
    parser.add_argument("--lr", type=float, default=0.0, help="override every method's learning rate (0: RECIPES)")
    parser.add_argument("--schedule", default="", help="override every method's learning-rate schedule ('': RECIPES)")
    parser.add_argument("--per-pair", type=int, default=0, help="pictures per (shape, style) pair (0: RECIPES)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=6, help="judge with the first N prompts (5 styles / 6 shapes)")
    parser.add_argument("--sample-steps", type=int, default=SAMPLING["steps"])
    parser.add_argument("--judge-seed", type=int, default=SAMPLING["seed"],
                        help="first sampling seed of the judgement (seeds judge-seed .. judge-seed + seeds - 1)")
    if extra_arguments:  # a script's own options
        extra_arguments(parser)
    parser.add_argument("--out", type=Path, default=ADAPTERS, help="where the files go (a smoke run: a new scratch "
                        "folder unless given)")
    args = parse_args(parser, {"steps": 2, "per_pair": 1, "seeds": 1, "prompts": 1, "sample_steps": 2})
    if harness.SMOKE and args.out == ADAPTERS:  # a smoke run never writes the committed adapters
        args.out = Path(tempfile.mkdtemp(prefix="csa-demo-adapters-smoke-"))
    return args


def world_session() -> tuple:
    """(nodes, model, clip, vae, evaluators): the pack's nodes in-process, the world checkpoint, its evaluators."""
    torch.set_num_threads(1)
    nodes, _ = harness.start_comfy()
    import comfy.sd
    from evaluate import WORLD_CHECKPOINT
    from evaluators import load

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(WORLD_CHECKPOINT))
    return nodes, model, clip, vae, load()[0]


def main() -> None:
    args = demo_arguments(__doc__.splitlines()[0], "comma-separated adapter names (method-kind, e.g. lora-star)")
    nodes, model, clip, vae, evaluators = world_session()
    chosen = [d for d in DEMOS if not args.only or f"{d.method}-{d.kind}" in args.only.split(",")]
    rows, notes = [], []
    for demo in chosen:
        cpu, wall, load_before = time.process_time(), time.time(), os.getloadavg()[0]
        adapter, *_, path = train(nodes, model, clip, vae, demo, args)
        cpu, wall = time.process_time() - cpu, time.time() - wall
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, args.out / Path(path).name)
        share, labels = judged(nodes, model, clip, vae, adapter, demo.kind, evaluators, args)
        size = (args.out / Path(path).name).stat().st_size
        rows.append((f"{demo.name} ({demo.kind} {'content' if demo.kind == 'star' else 'style'})",
                     f"{share:.0%} {'star' if demo.kind == 'star' else 'zigzag'} ({'pass' if share >= 0.8 else 'FAIL'}"
                     f" at 80%); {cpu:.0f} CPU s, {wall:.0f} s wall (load {load_before:.1f}); {size / 1024:.0f} KiB"))
        notes.append(f"- {demo.name}: " + "; ".join(labels) + f"; loss per 100 steps: {loss_summary(path)}")
        print(rows[-1], flush=True)
    if any(d.kind == "zigzag" for d in chosen):
        rows.append(("world VAE round trip of real zigzag pictures, labelled zigzag (the style bar's ceiling)",
                     f"{vae_ceiling(vae, evaluators):.0%}"))
    record("World demo adapters trained with the pack's trainers", rows, notes=(
        f"Content: stars in the 5 base styles, captions 'a <style> {CONTENT_WORD}'; "
        f"style: zigzag on the 6 base shapes, captions 'a {STYLE_WORD} <shape>'. LoRA and QR-LoRA: every linear "
        f"layer, v loss; ConsisLoRA: the world block split, content mode (ε loss, then x0 from a "
        f"third of the run) or style mode (half the steps, then a fresh style block with x0 loss and noise offset "
        f"0.03). " + "; ".join(f"{m}: rank {r['rank']}, {r['steps']} steps at lr {r['lr']} ({r['schedule']}), "
                               f"{r['per_pair']} pictures per pair"
                               for m, r in ((m, with_overrides(r, args)) for m, r in RECIPES.items()))
        + f". Batch 4, AdamW (weight decay 0.01, "
        f"clip 1.0), fp16 files. Judged with Euler {args.sample_steps} steps, CFG {SAMPLING['cfg']}, seeds "
        f"{args.judge_seed}..{args.judge_seed + args.seeds - 1}. Labels per prompt:\n\n" + "\n".join(notes)))

if __name__ == "__main__":
    main()
