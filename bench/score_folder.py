"""Score a folder of images against content / style references and a prompt, with the nodes' own scoring code.

    .venv/bin/python bench/score_folder.py OUTPUTS/ --content ref.png --content-encoder dinov2_large.safetensors \\
        --style style_refs/ --style-encoder clip_vision_vit_l.safetensors \\
        --prompt "a dog in the style of [v]" --clip clip_l_with_projection.safetensors
    .venv/bin/python bench/score_folder.py --smoke

Images and references are folders (every .png / .jpg / .jpeg / .webp in them, sorted) or files, of any sizes.
Encoders load with ComfyUI's own loaders (comfy.clip_vision.load, comfy.sd.load_clip), in this process on
the CPU, and the scores are those of Score Content / Style / Prompt (nodes/scoring.py, core/scores.py).
``--smoke`` builds tiny random encoders and images in a temporary folder, scores them, checks that an image
scores 1 against itself, and writes nothing into the repository.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from harness import comfy_host, names, start_comfy

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
# Tiny encoders of the classes ComfyUI's CLIP Vision loader builds: (ComfyUI config file, overrides).
# DINOv2 keeps 518 px: ComfyUI's DINOv2 has fixed position embeddings for 37 x 37 patches.
TINY_ENCODERS = {
    "clip": ("clip_vision_config_vitl.json", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                              "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}),
    "dinov2": ("image_encoders/dino2_large.json", {"hidden_size": 32, "num_attention_heads": 2,
                                                   "num_hidden_layers": 2}),
    "siglip": ("clip_vision_siglip_384.json", {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                               "num_hidden_layers": 2, "image_size": 32, "patch_size": 8}),
}


def tiny_encoder(kind: str, directory: Path, seed: int = 0, **changes):
    """A CLIP_VISION of ComfyUI's own class at a tiny size (config keys in ``changes`` override), seeded weights."""
    import comfy.clip_vision
    from build_tiny_models import init_weights_

    config_name, overrides = TINY_ENCODERS[kind]
    config = json.loads((Path(comfy.clip_vision.__file__).parent / config_name).read_text()) | overrides | changes
    path = Path(directory) / f"tiny_{kind}_{seed}.json"
    path.write_text(json.dumps(config))
    encoder = comfy.clip_vision.ClipVisionModel(str(path))
    init_weights_(encoder.model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for module in encoder.model.modules():
            if hasattr(module, "lambda1"):  # DINOv2's layer scale: init_weights_ zeroes 1-D weights, which would
                module.lambda1.fill_(1.0)  # switch every block off and leave the CLS token blind to the image
    return encoder


FLAGS = {"content_images": "--content", "content_encoder": "--content-encoder", "style_images": "--style",
         "style_encoder": "--style-encoder", "clip": "--clip", "prompt": "--prompt"}


def load_encoder(path: Path | None):
    """A CLIP_VISION through ComfyUI's loader (None without a path)."""
    import comfy.clip_vision

    if path is None:
        return None
    encoder = comfy.clip_vision.load(str(path))
    if encoder is None:
        raise SystemExit(f"{path}: ComfyUI does not recognise this CLIP vision file (it accepts CLIP ViT-L/H/bigG, "
                         f"SigLIP and DINOv2 large/giant)")
    return encoder


def image_paths(sources: list[str]) -> list[Path]:
    paths = []
    for source in map(Path, sources):
        if source.is_dir():
            paths += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file():
            paths.append(source)
        else:
            raise SystemExit(f"{source}: no such file or folder")
    return paths


def load_image(path: Path) -> torch.Tensor:
    """(1, H, W, 3) in [0, 1], as ComfyUI's LoadImage reads a picture (EXIF rotation applied)."""
    with Image.open(path) as picture:
        pixels = np.asarray(ImageOps.exif_transpose(picture).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels)[None]


def score_paths(scoring, images: list[Path], content: list[Path], content_encoder, style: list[Path], style_encoder,
                prompt: str, clip) -> dict[str, torch.Tensor]:
    """Per-image scores; every picture is its own batch, so sizes may differ."""
    if not images:
        raise SystemExit("images: no image found")
    references = {name: [load_image(p) for p in paths] or None for name, paths in
                  (("content_images", content), ("style_images", style))}
    scorer = scoring.build_scorer(content_encoder=content_encoder, style_encoder=style_encoder, prompt=prompt,
                                  clip=clip, **references)
    return scorer.score([load_image(p) for p in images])


def print_table(paths: list[Path], scores: dict[str, torch.Tensor]) -> None:
    width = max(len(p.name) for p in paths) + 2
    print(f"{'image':<{width}}" + "".join(f"{metric:>10}" for metric in scores))
    for index, path in enumerate(paths):
        print(f"{path.name:<{width}}" + "".join(f"{float(values[index]):10.4f}" for values in scores.values()))
    print(f"{'mean':<{width}}" + "".join(f"{float(values.mean()):10.4f}" for values in scores.values()))


def smoke(scoring) -> int:
    """Tiny encoders, three generated pictures of different sizes, the first one also the content reference."""
    import comfy.sd

    with tempfile.TemporaryDirectory(prefix="csa-score-smoke-") as folder:
        folder = Path(folder)
        generator = np.random.default_rng(0)
        for index, (height, width) in enumerate([(64, 64), (40, 72), (90, 33)]):
            pixels = generator.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"image_{index}.png")
        images = image_paths([str(folder)])
        clip_file = comfy_host.TINY_MODELS_DIR / names.CLIP_L_NAME
        clip = comfy.sd.load_clip(ckpt_paths=[str(clip_file)]) if clip_file.exists() else None
        prompt = "a striped circle" if clip is not None else ""
        scores = score_paths(scoring, images, images[:1], tiny_encoder("dinov2", folder, 1), images[1:],
                             tiny_encoder("clip", folder, 2), prompt, clip)
        print_table(images, scores)
        if clip is None:
            print(f"(no prompt score: {clip_file} is missing; scripts/setup_host.sh builds it)")
    self_score = float(scores["content"][0])
    if abs(self_score - 1.0) > 1e-5:
        print(f"smoke FAILED: image_0 against itself scores {self_score}, not 1")
        return 1
    print("smoke ok: image_0 scores 1 against itself")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*", help="folders or files of the images to score")
    parser.add_argument("--content", nargs="+", default=[], help="content reference folders or files")
    parser.add_argument("--content-encoder", type=Path, help="a DINOv2 CLIP-vision file (large or giant)")
    parser.add_argument("--style", nargs="+", default=[], help="style reference folders or files")
    parser.add_argument("--style-encoder", type=Path, help="a CLIP ViT CLIP-vision file (also used for --prompt)")
    parser.add_argument("--prompt", default="", help="score the images against this prompt (needs --clip)")
    parser.add_argument("--clip", type=Path, help="a CLIP text encoder file with its text projection")
    parser.add_argument("--smoke", action="store_true", help="tiny random encoders and images; checks and exits")
    args = parser.parse_args()
    if not args.smoke and not args.images:
        parser.error("give the images to score, or --smoke")
    _, base = start_comfy()
    scoring = comfy_host.pack_module(base, "nodes.scoring")
    if args.smoke:
        return smoke(scoring)
    import comfy.sd

    images = image_paths(args.images)
    clip = comfy.sd.load_clip(ckpt_paths=[str(args.clip)]) if args.clip else None
    try:
        scores = score_paths(scoring, images, image_paths(args.content), load_encoder(args.content_encoder),
                             image_paths(args.style), load_encoder(args.style_encoder), args.prompt, clip)
    except ValueError as error:
        name, _, rest = str(error).partition(": ")
        raise SystemExit(f"{FLAGS.get(name, name)}: {rest}" if rest else str(error)) from None
    print_table(images, scores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
