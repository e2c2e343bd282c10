"""Which transformer block of the world model carries shape and which carries texture: the measurement behind the
ConsisLoRA / B-LoRA 'world' block split (and, by position, the SD1.5 preset).

    .venv/bin/python bench/world/block_split.py [--steps 200] [--seeds 8]

For each of the world UNet's four transformer blocks, Train Adapter (LoRA on that block's attention projections
only, as ConsisLoRA trains its blocks) learns pictures of a held-out shape in one texture, captioned 'a sks'
(a word the base model never saw). Then 'a sks' is sampled with only that adapter, and the world evaluators say
how often the pictures take the trained shape (the block changes shape: content) and the trained texture (the
block changes texture: style). The texture is a base style (every combination with the held-out shape is held out)
and the one the base model draws least for 'a sks' without an adapter: a texture the base model already gives the
new word would make every block look like a style block. Rows: no adapter (the baseline), each block, all four.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
import harness  # noqa: E402
from harness import parse_args, record  # noqa: E402
from world import BASE_STYLES, render  # noqa: E402

BLOCKS = ("input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1")
SHAPE = "star"


def train_block(nodes, model, clip, vae, data, blocks: str, args):
    options = nodes["CSA_TrainingOptions"].execute(
        batch_size=4, accumulation=1, schedule="constant", warmup_steps=0, weight_decay=0.01, grad_clip=1.0,
        min_snr_gamma=0.0, noise_offset=0.0, save_every=0, preview_prompt="", preview_every=0, preview_seed=0,
        precision="fp32").args[0]
    return nodes["CSA_TrainAdapter"].execute(
        model=model, clip=clip, vae=vae, data=data, targets="attention in blocks", blocks=blocks, rank=args.rank,
        alpha=float(args.rank), steps=args.steps, lr=args.lr, loss="v", role="generic", seed=0, filename="",
        overwrite=False, resume_from="none", options=options).args[0]


def labels(nodes, model, clip, vae, adapter, evaluators, args, prompt: str = "a sks") -> tuple[list[str], list[str]]:
    """The evaluators' (shapes, styles) of ``prompt`` sampled with ``adapter`` alone (None: the base model)."""
    from evaluate import sample_caption
    from evaluators import classify

    patched = model if adapter is None else nodes["CSA_ApplyAdapters"].execute(model=model, adapter=adapter,
                                                                               block_strengths="").args[0]
    images = sample_caption(patched, clip, vae, prompt, args.seeds, args.sample_steps, 4.0, 1000)
    return classify(evaluators, images)


def least_drawn_style(styles: list[str]) -> str:
    """The base style the base model draws least often for 'a sks' (ties: the earlier in BASE_STYLES)."""
    return min(BASE_STYLES, key=styles.count)


def split_by_shape(measured: dict[str, tuple[float, float]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(content blocks, style blocks): the half of the blocks whose one-block adapters drew the trained shape most
    often, and the other half. No block of the world changes shape alone (each also changes texture: bench/RESULTS.md),
    so one block per part left each part a quarter of the attention: ConsisLoRA's demo adapters reached 25% / 42% with
    it, 75% / 83% with halves (the recipe search in bench/RESULTS.md)."""
    ranked = sorted(BLOCKS, key=lambda b: -measured[b][0])  # sorted is stable: ties keep the UNet's order
    half = len(ranked) // 2
    content = tuple(b for b in BLOCKS if b in ranked[:half])
    return content, tuple(b for b in BLOCKS if b not in content)


def premise(nodes, model, clip, vae, evaluators, args, base) -> None:
    """Does the world support B-LoRA's / ConsisLoRA's premise on the method benchmark's entangled references? For the
    content reference (the held-out star in checkered, 'a sks') and the style reference (zigzag on a circle, 'a
    zkz'), a LoRA per transformer block and one per half of the world split (BLOCK_SPLITS["world"]), each sampled
    alone on its own caption: what does it change, the reference's shape or its texture? The premise holds when the
    content half learns the content reference's shape without its texture and the style half the style reference's
    texture without its shape."""
    import comfy_host
    from method_benchmark import ENTANGLED_CONTENT_STYLE, ENTANGLED_STYLE_SHAPE

    content_blocks, style_blocks = comfy_host.pack_module(base, "core.trainers").BLOCK_SPLITS["world"]
    references = {"content": (SHAPE, ENTANGLED_CONTENT_STYLE, "a sks"), "style": (ENTANGLED_STYLE_SHAPE, "zigzag", "a zkz")}
    groups = (*((b, b) for b in BLOCKS), ("content half (world split)", ", ".join(content_blocks)),
              ("style half (world split)", ", ".join(style_blocks)))
    started, rows, measured = time.process_time(), [], {}
    for role, (shape, texture, caption) in references.items():
        pictures = torch.stack([torch.from_numpy(render(shape, texture, 600 + i).image) for i in range(args.images)])
        data = nodes["CSA_TrainingImages"].execute(images=pictures.float() / 255, captions=caption, image_folder="",
                                                   repeats=1, trigger_word="", resolution=64).args[0]
        for name, blocks in (("no adapter", None), *groups):
            shapes, styles = labels(nodes, model, clip, vae, None if blocks is None else train_block(
                nodes, model, clip, vae, data, blocks, args), evaluators, args, caption)
            measured[role, name] = (float(np.mean([s == shape for s in shapes])),
                                    float(np.mean([s == texture for s in styles])))
            rows.append((f"{role} reference ({texture} {shape}, '{caption}')", name,
                         f"{measured[role, name][0]:.0%}", f"{measured[role, name][1]:.0%}"))
            print(" | ".join(rows[-1]), flush=True)
    content_shape, content_texture = measured["content", "content half (world split)"]
    style_shape, style_texture = measured["style", "style half (world split)"]
    holds = {"content half": content_shape >= 0.5 > content_texture, "style half": style_texture >= 0.5 > style_shape}
    verdict = "; ".join(f"{part}: {'holds' if ok else 'does NOT hold'}" for part, ok in holds.items())
    rows.append(("verdict", "premise (content half: shape >= 50% and texture < 50%; style half: texture >= 50% and "
                 "shape < 50%)", verdict, ""))
    record(f"Block premise on the entangled references: what a LoRA on each block of the world model learns "
           f"({args.steps} steps each)", rows, columns=("reference", "adapter on", "reference's shape drawn",
                                                        "reference's texture drawn"), notes=(
        f"Each adapter: rank {args.rank} on the attention projections of the named blocks, {args.steps} steps, lr "
        f"{args.lr}, batch 4, v loss, on {args.images} pictures of the reference with its caption; then that caption "
        f"sampled ({args.seeds} seeds, Euler {args.sample_steps} steps, CFG 4) with that adapter only, labelled by the "
        f"world evaluators (strict style). B-LoRA and ConsisLoRA compose a content adapter's content blocks with a "
        f"style adapter's style blocks: that works only where the content blocks take the shape without the texture "
        f"and the style blocks the texture without the shape. {verdict}. The world was not tuned toward it. "
        f"{time.process_time() - started:.0f} CPU seconds in all."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--premise", action="store_true", help="the block premise on the method benchmark's entangled "
                        "references (premise()) instead of the split measurement")
    args = parse_args(parser, {"steps": 2, "images": 2, "seeds": 1, "sample_steps": 2})
    torch.set_num_threads(1)
    nodes, base = harness.start_comfy()
    import comfy.sd
    from evaluate import WORLD_CHECKPOINT
    from evaluators import load

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(WORLD_CHECKPOINT))
    evaluators, _ = load()
    if args.premise:
        premise(nodes, model, clip, vae, evaluators, args, base)
        return
    started = time.process_time()
    baseline = labels(nodes, model, clip, vae, None, evaluators, args)
    texture = least_drawn_style(baseline[1])
    pictures = torch.stack([torch.from_numpy(render(SHAPE, texture, 600 + i).image) for i in range(args.images)])
    data = nodes["CSA_TrainingImages"].execute(images=pictures.float() / 255, captions="a sks", image_folder="",
                                               repeats=1, trigger_word="", resolution=64).args[0]
    rows, measured = [], {}
    for name, blocks in (("no adapter", None), *((b, b) for b in BLOCKS), ("all four blocks", ", ".join(BLOCKS))):
        shapes, styles = baseline if blocks is None else labels(
            nodes, model, clip, vae, train_block(nodes, model, clip, vae, data, blocks, args), evaluators, args)
        shape, textured = float(np.mean([s == SHAPE for s in shapes])), float(np.mean([s == texture for s in styles]))
        measured[name] = (shape, textured)
        rows.append((name, f"{SHAPE} {shape:.0%}, {texture} {textured:.0%}"))
        print(f"{name}: {rows[-1][1]}", flush=True)
    content, style = split_by_shape(measured)
    rows.append(("content blocks (the half whose adapters change the shape most; ties: the earlier block)",
                 ", ".join(content)))
    rows.append(("style blocks (the other half)", ", ".join(style)))
    record(f"Block split of the world model: one LoRA per transformer block ({args.steps} steps each)", rows, notes=(
        f"Each adapter: rank {args.rank} on one block's attention projections, {args.steps} steps, lr {args.lr}, "
        f"batch 4, v loss, trained on {args.images} pictures of a {texture} {SHAPE} captioned 'a sks' ({texture}: the "
        f"base style the base model drew least for 'a sks', labels {', '.join(baseline[1])}); "
        f"then 'a sks' sampled ({args.seeds} seeds, Euler {args.sample_steps} steps, CFG 4) with that adapter only, "
        f"labelled by the world evaluators. {time.process_time() - started:.0f} CPU seconds in all."))


if __name__ == "__main__":
    main()
