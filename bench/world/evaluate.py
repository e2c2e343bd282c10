"""How well the world base model obeys its prompts: sample every base caption, label the pictures.

    .venv/bin/python bench/world/evaluate.py [--seeds 4] [--steps 20] [--cfg 4]

Samples "a <style> <shape>" for the 30 base captions with ComfyUI's own loader and KSampler (Euler),
decodes with the checkpoint's VAE, and labels every image with the evaluators. Prints and records the
content and style accuracy (the reference later method benchmarks compare against), writes a contact
sheet of the generations to bench/world/generations.png.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from evaluators import classify, diversity, load  # noqa: E402
import harness  # noqa: E402
from harness import comfy_host, parse_args, record  # noqa: E402  (puts scripts/ on the path)
from model_names import WORLD_CHECKPOINT_NAME  # noqa: E402
from world import BASE_SHAPES, BASE_STYLES, caption  # noqa: E402

WORLD_CHECKPOINT = comfy_host.TINY_MODELS_DIR / WORLD_CHECKPOINT_NAME


def sample_caption(model, clip, vae, text: str, seeds: int, steps: int, cfg: float, seed: int) -> torch.Tensor:
    """(seeds, 3, 64, 64) images in [0, 1] for one caption, through ComfyUI's KSampler."""
    import nodes

    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(seeds, 4, 8, 8)}
    samples = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]
    with torch.no_grad():
        return vae.decode(samples["samples"]).movedim(-1, 1).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--captions", type=int, default=len(BASE_SHAPES) * len(BASE_STYLES),
                        help="how many base captions (in order)")
    args = parse_args(parser, {"seeds": 1, "steps": 2, "captions": 2})
    comfy_host.import_comfyui(base_directory=Path(tempfile.mkdtemp()))
    import comfy.sd
    from PIL import Image

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(WORLD_CHECKPOINT))
    evaluators, metadata = load()
    started = time.time()
    rows, sheet, content_hits, style_hits, spreads = [], [], [], [], []
    pairs = [(shape, style) for shape in BASE_SHAPES for style in BASE_STYLES][:args.captions]
    for shape, style in pairs:
        images = sample_caption(model, clip, vae, caption(shape, style), args.seeds, args.steps, args.cfg, args.seed)
        shapes, styles = classify(evaluators, images)
        content_hits += [s == shape for s in shapes]
        style_hits += [s == style for s in styles]
        pixels = (images.movedim(1, -1).numpy() * 255).round().astype(np.uint8)
        spreads.append(diversity(pixels))
        sheet.append(np.concatenate(list(pixels), axis=1))
        rows.append(f"{caption(shape, style)}: shapes {shapes}, styles {styles}")
    if not harness.SMOKE:
        Image.fromarray(np.concatenate(sheet, axis=0)).save(HERE / "generations.png")
    content, style = float(np.mean(content_hits)), float(np.mean(style_hits))
    both = float(np.mean([a and b for a, b in zip(content_hits, style_hits)]))
    record(f"World base model obeys its prompts ({len(content_hits)} images: {len(pairs)} base captions x {args.seeds} seeds)", [
        ("content accuracy (evaluator says the prompted shape)", f"{content:.1%}"),
        ("style accuracy (evaluator says the prompted style)", f"{style:.1%}"),
        ("both right", f"{both:.1%}"),
        ("mean diversity across seeds (RMS pixel distance)", f"{np.mean(spreads):.3f}"),
        ("evaluators' held-out accuracy on generator images",
         f"content {metadata.get('accuracy.content')}, style {metadata.get('accuracy.style')}"),
        ("sampling", f"Euler, {args.steps} steps, CFG {args.cfg}, 64x64, {time.time() - started:.0f} s in all"),
    ], notes="Per caption:\n\n" + "\n".join(f"- {r}" for r in rows))


if __name__ == "__main__":
    main()
