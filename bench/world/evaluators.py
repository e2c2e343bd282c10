"""Ground-truth evaluators for the miniature world: which shape, which style, and exact measures.

Two small CNN classifiers (content: 8 shapes, style: 7 styles) trained on generator images with blur,
noise and colour jitter, so they also read the softer pictures a small diffusion model draws.

    .venv/bin/python bench/world/evaluators.py train     # trains both, writes weights/evaluators.safetensors
    .venv/bin/python bench/world/evaluators.py check     # held-out accuracy on fresh generator images
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from world import BACKGROUND, SHAPES, STYLES, render, render_scene  # noqa: E402

WEIGHTS = HERE / "weights" / "evaluators.safetensors"
TRAIN_SEEDS = range(0, 10_000_000, 7)  # training draws seeds 7k; held-out checks use seeds 7k + 3
HELD_OUT_OFFSET = 3


class Classifier(torch.nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        layers, width = [], 3
        for channels in (16, 32, 64):
            layers += [torch.nn.Conv2d(width, channels, 3, padding=1), torch.nn.GroupNorm(8, channels), torch.nn.SiLU(),
                       torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2)]
            width = channels
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128), torch.nn.SiLU(),
                                        torch.nn.Linear(128, classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, 64, 64) in [0, 1] -> logits (read at 32x32: every pattern has a period of 8+ px)."""
        return self.head(self.features(F.avg_pool2d(images, 2) * 2 - 1))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour jitter of the strength a small VAE / UNet introduces."""
    b = batch.shape[0]
    sigma = 0.4 + float(torch.rand(1, generator=generator)) * 1.4  # one blur width per batch, on a random half
    kernel_x = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-kernel_x ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, 7).repeat(3, 1, 1, 1)
    blurred = F.conv2d(F.pad(batch, (3, 3, 0, 0), mode="replicate"), k, groups=3)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 3, 3), mode="replicate"), k.transpose(2, 3), groups=3)
    chosen = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1)
    batch = torch.where(chosen, blurred, batch)
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=generator) - 0.5) * 0.2
    noise = torch.randn(batch.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.08
    return (batch * gain + noise).clamp(0, 1)


def random_batch(size: int, generator: torch.Generator, seed_offset: int = 0):
    """Half single objects, half one object of a two-object scene as judge_regions() sees it (the other painted out)."""
    shapes = torch.randint(0, len(SHAPES), (size,), generator=generator)
    styles = torch.randint(0, len(STYLES), (size,), generator=generator)
    seeds = torch.randint(0, 1_000_000, (size,), generator=generator) * 7 + seed_offset
    images = []
    for i, (a, b, s) in enumerate(zip(shapes.tolist(), styles.tolist(), seeds.tolist())):
        if i % 2 == 0:
            images.append(render(SHAPES[a], STYLES[b], s).image)
            continue
        other = ((SHAPES[(a + 1 + s % (len(SHAPES) - 1)) % len(SHAPES)], STYLES[(b + 1 + s % (len(STYLES) - 1)) % len(STYLES)]))
        scene = render_scene(((SHAPES[a], STYLES[b]), other), s)
        images.append(isolate(scene.image, box_around(scene.masks[0])))
    return to_tensor(np.stack(images)), shapes, styles


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels that differ from the plain background (the light stripes of some styles do not)."""
    return np.abs(image.astype(np.int16) - np.array(BACKGROUND, np.int16)).max(-1) > 30


def box_around(mask: np.ndarray, margin: int = 2) -> np.ndarray:
    """The mask's bounding box grown by ``margin`` pixels, as a bool mask."""
    box = np.zeros_like(mask)
    rows, cols = np.nonzero(mask)
    if len(rows):
        box[max(0, rows.min() - margin):rows.max() + margin + 1, max(0, cols.min() - margin):cols.max() + margin + 1] = True
    return box


def isolate(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The picture with everything outside ``region`` painted background."""
    out = np.broadcast_to(np.array(BACKGROUND, np.uint8), image.shape).copy()
    out[region] = image[region]
    return out


def split_two(image: np.ndarray, iterations: int = 20) -> list[np.ndarray]:
    """The foreground split into two objects (2-means on pixel positions): [(H, W) bool, (H, W) bool], or fewer
    when there is too little foreground. A picture of one object comes back as two halves of it (judged wrong)."""
    points = np.argwhere(foreground(image)).astype(np.float32)
    if len(points) < 8:
        return []
    axis = int(np.argmax(points.std(0)))
    order = np.argsort(points[:, axis])
    centres = np.stack([points[order[: len(order) // 2]].mean(0), points[order[len(order) // 2:]].mean(0)])
    for _ in range(iterations):
        nearest = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), 1)
        centres = np.stack([points[nearest == k].mean(0) if (nearest == k).any() else centres[k] for k in range(2)])
    masks = []
    for k in range(2):
        mask = np.zeros(image.shape[:2], bool)
        chosen = points[nearest == k].astype(int)
        mask[chosen[:, 0], chosen[:, 1]] = True
        masks.append(mask)
    return masks


def window_around(mask: np.ndarray, size: int = 64) -> tuple[slice, slice]:
    """The size x size window of the picture centred on the mask's pixels, moved inside the picture."""
    rows, cols = np.nonzero(mask)
    starts = [int(np.clip(round(float(np.mean(c)) - size / 2) if len(c) else 0, 0, extent - size))
              for c, extent in ((rows, mask.shape[0]), (cols, mask.shape[1]))]
    return slice(starts[0], starts[0] + size), slice(starts[1], starts[1] + size)


def regions_judged(models, image: np.ndarray) -> list[tuple[np.ndarray, str, str]]:
    """One (H, W, 3) uint8 picture of two objects, 64x64 or a wide canvas (H, W >= 64): [(region mask, shape, style)],
    each object judged in its own region (the other painted out), in the 64x64 window centred on it."""
    regions = split_two(image)
    if not regions:
        return []
    crops = []
    for region in regions:
        rows, cols = window_around(region)
        crops.append(isolate(image, box_around(region))[rows, cols])
    shapes, styles = classify(models, to_tensor(np.stack(crops)))
    return list(zip(regions, shapes, styles))


def judge_regions(models, images: np.ndarray) -> list[list[tuple[str, str]]]:
    """Per (H, W, 3) uint8 picture of two objects (see regions_judged): [(shape, style) of each object, judged in its own region]."""
    return [[(shape, style) for _, shape, style in regions_judged(models, image)] for image in images]


def train(steps: int = 800, batch: int = 32, seed: int = 0) -> dict[str, Classifier]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    models = {"content": Classifier(len(SHAPES)), "style": Classifier(len(STYLES))}
    optimizer = torch.optim.Adam([p for m in models.values() for p in m.parameters()], lr=1e-3)
    for step in range(steps):
        images, shapes, styles = random_batch(batch, generator)
        images = augment(images, generator)
        loss = F.cross_entropy(models["content"](images), shapes) + F.cross_entropy(models["style"](images), styles)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"evaluators step {step} loss {float(loss.detach()):.4f}", flush=True)
    return {k: m.eval() for k, m in models.items()}


def save(models: dict[str, Classifier], accuracy: dict[str, float], path: Path = WEIGHTS) -> None:
    from safetensors.torch import save_file

    state = {f"{name}.{k}": v for name, m in models.items() for k, v in m.state_dict().items()}
    save_file(state, str(path), metadata={f"accuracy.{k}": f"{v:.4f}" for k, v in accuracy.items()})


def load() -> tuple[dict[str, Classifier], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(WEIGHTS))
    with safe_open(str(WEIGHTS), "pt") as handle:
        metadata = handle.metadata()
    models = {"content": Classifier(len(SHAPES)), "style": Classifier(len(STYLES))}
    for name, model in models.items():
        model.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
        model.eval()
    return models, metadata


@torch.no_grad()
def classify(models: dict[str, Classifier], images: torch.Tensor) -> tuple[list[str], list[str]]:
    """images: (B, 3, 64, 64) in [0, 1] (other sizes are resized) -> (shape names, style names)."""
    if images.shape[-1] != 64:
        images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
    shapes = models["content"](images).argmax(1)
    styles = models["style"](images).argmax(1)
    return [SHAPES[i] for i in shapes], [STYLES[i] for i in styles]


def held_out_accuracy(models, count: int = 400, seed: int = 123) -> dict[str, float]:
    """Accuracy on fresh generator images: all of them, and the scene objects (odd indices) alone."""
    generator = torch.Generator().manual_seed(seed)
    images, shapes, styles = random_batch(count, generator, seed_offset=HELD_OUT_OFFSET)
    got_shapes, got_styles = classify(models, images)
    content = np.array([SHAPES[i] == g for i, g in zip(shapes, got_shapes)])
    style = np.array([STYLES[i] == g for i, g in zip(styles, got_styles)])
    return {"content": float(content.mean()), "style": float(style.mean()),
            "content_scene_objects": float(content[1::2].mean()), "style_scene_objects": float(style[1::2].mean())}


def change_outside_mask(image_a: np.ndarray, image_b: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute change (0..1) of the pixels outside the object mask."""
    outside = ~mask
    return float(np.abs(image_a[outside].astype(np.float32) - image_b[outside].astype(np.float32)).mean() / 255.0)


def diversity(images: np.ndarray) -> float:
    """Mean pairwise RMS distance (0..1) between images of the same caption across seeds."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    pairs = [np.sqrt(np.mean((flat[i] - flat[j]) ** 2)) for i in range(len(flat)) for j in range(i + 1, len(flat))]
    return float(np.mean(pairs)) if pairs else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["train", "check"])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where train writes the weights")
    sys.path.insert(0, str(HERE.parent))
    import tempfile

    import harness

    args = harness.parse_args(parser, {"steps": 2})
    if harness.SMOKE and args.out == WEIGHTS:
        args.out = Path(tempfile.mkdtemp(prefix="csa-evaluators-smoke-")) / WEIGHTS.name
    torch.set_num_threads(1)
    if args.command == "train":
        models = train(args.steps)
        accuracy = held_out_accuracy(models, count=40 if harness.SMOKE else 400)
        save(models, accuracy, args.out)
        print(f"wrote {args.out}")
    else:
        models, _ = load()
        accuracy = held_out_accuracy(models)
    print(f"held-out accuracy on fresh generator images: {accuracy}")


if __name__ == "__main__":
    main()
