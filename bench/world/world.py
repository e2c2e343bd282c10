"""A miniature world: 64x64 pictures of a shape (the content) filled with a texture (the style).

Everything is a pure function of (shape, style, seed): same inputs, same pixels, mask and caption. Each
style is a pattern with its own palette, so it survives a small latent; the background is plain. Scenes
hold one object or two side by side; captions come in several phrasings, as people write prompts.

    render("triangle", "striped", seed=3) -> Sample(image uint8 (64, 64, 3), mask bool (64, 64), caption)
    render_scene((("circle", "red"), ("square", "striped")), seed=3) -> Scene(image, masks, objects)
    render_wide_scene((("circle", "red"), ("square", "striped")), seed=3) -> Scene on a 64x128 or 128x64 canvas
    phrase("circle", "red", "no article") -> "red circle"
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SIZE = 64
# Picture sizes (height, width): one object; two objects on the wide canvas (render_wide_scene), by orientation.
SQUARE, LANDSCAPE, PORTRAIT = (SIZE, SIZE), (SIZE, 2 * SIZE), (2 * SIZE, SIZE)
BACKGROUND = (236, 236, 230)
BASE_SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
HELD_OUT_SHAPES = ("star", "heart")
BASE_STYLES = ("red", "striped", "dotted", "checkered", "gradient")
HELD_OUT_STYLES = ("zigzag", "speckled")
SHAPES = BASE_SHAPES + HELD_OUT_SHAPES
STYLES = BASE_STYLES + HELD_OUT_STYLES


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (64, 64, 3) uint8
    mask: np.ndarray  # (64, 64) bool, the object
    shape: str
    style: str

    @property
    def caption(self) -> str:
        return caption(self.shape, self.style)


def caption(shape: str, style: str) -> str:
    return f"a {style} {shape}"


# How one object is described. The world model trains on every form but the held-out one, which evaluation adds.
CAPTION_FORMS = {
    "a <style> <shape>": "a {style} {shape}",
    "no article": "{style} {shape}",
    "with a pattern": "a {shape} with a {style} pattern",
    "shape first": "a {shape}, {style}",
    "photo of": "a photo of a {style} {shape}",
    "plain background": "a {style} {shape} on a plain background",
    "photo, no article": "photo of {style} {shape}",
    "shape alone": "a {shape}",
    "style alone": "{style}",
}
HELD_OUT_FORM = {"held out: an image of one": "an image of one {style} {shape}"}
TWO_OBJECT_FORMS = {
    "a <style> <shape> and a <style> <shape>": "a {style1} {shape1} and a {style2} {shape2}",
    "no article": "{style1} {shape1} and {style2} {shape2}",
    "with patterns": "a {shape1} with a {style1} pattern and a {shape2} with a {style2} pattern",
    "photo of": "a photo of a {style1} {shape1} and a {style2} {shape2}",
}


def phrase(shape: str, style: str, form: str) -> str:
    """The caption of one object in a named form (CAPTION_FORMS or HELD_OUT_FORM)."""
    return {**CAPTION_FORMS, **HELD_OUT_FORM}[form].format(shape=shape, style=style)


def phrase_two(first: tuple[str, str], second: tuple[str, str], form: str) -> str:
    """The caption of two (shape, style) objects, in the order given, in a TWO_OBJECT_FORMS form."""
    return TWO_OBJECT_FORMS[form].format(shape1=first[0], style1=first[1], shape2=second[0], style2=second[1])


def shape_mask(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = (x - cx) / radius, (y - cy) / radius
    r = np.hypot(dx, dy)
    masks = {
        "circle": r <= 1.0,
        "ring": (r <= 1.0) & (r >= 0.55),
        "square": (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85),
        "diamond": np.abs(dx) + np.abs(dy) <= 1.1,
        "cross": ((np.abs(dx) <= 0.32) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= 0.32) & (np.abs(dx) <= 1.0)),
        "triangle": (dy <= 0.8) & (dy >= -1.0 + 1.8 * np.abs(dx) / 1.04 - 0.0) & (np.abs(dx) <= 1.04),
    }
    if shape == "star":
        angle = np.arctan2(dy, dx)
        masks["star"] = r <= 0.45 + 0.5 * (0.5 + 0.5 * np.cos(5 * angle + math.pi / 2)) ** 3
    if shape == "heart":
        hx, hy = dx * 1.1, -dy * 1.1 + 0.25
        masks["heart"] = (hx ** 2 + hy ** 2 - 0.6) ** 3 - hx ** 2 * hy ** 3 <= 0
    if shape not in masks:
        raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")
    return masks[shape]


def style_fill(style: str, rng: np.random.Generator, rows: tuple[float, float] = (0, SIZE - 1)) -> np.ndarray:
    """(64, 64, 3) float texture in [0, 255]; the phase varies with the seed, the palette does not.

    ``rows``: where the gradient runs from its first colour to its second (the whole picture, or one object's rows)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    ox, oy = rng.integers(0, 8, size=2)

    def two(colour_a, colour_b, select):
        return np.where(select[..., None], np.array(colour_a, np.float32), np.array(colour_b, np.float32))
    if style == "red":
        return np.broadcast_to(np.array((214, 38, 40), np.float32), (SIZE, SIZE, 3)).copy()
    if style == "striped":
        return two((24, 44, 150), (250, 250, 250), ((y + oy) // 4) % 2 == 0)
    if style == "dotted":
        return two((250, 214, 30), (20, 110, 50), np.hypot((x + ox) % 8 - 3.5, (y + oy) % 8 - 3.5) <= 2.2)
    if style == "checkered":
        return two((15, 15, 15), (255, 140, 0), (((x + ox) // 8 + (y + oy) // 8) % 2) == 0)
    if style == "gradient":
        t = ((y - rows[0]) / (rows[1] - rows[0])).clip(0, 1)[..., None]
        return (1 - t) * np.array((130, 30, 200), np.float32) + t * np.array((20, 210, 220), np.float32)
    if style == "zigzag":
        return two((200, 0, 120), (255, 230, 240), ((y + 2 * np.abs((x + ox) % 8 - 4) + oy) // 4) % 2 == 0)
    if style == "speckled":
        noise = rng.random((SIZE, SIZE)) < 0.5
        return two((90, 60, 30), (200, 170, 120), noise)
    raise ValueError(f"unknown style {style!r}; styles are {STYLES}")


def render(shape: str, style: str, seed: int) -> Sample:
    rng = np.random.default_rng([seed, SHAPES.index(shape) if shape in SHAPES else 99,
                                 STYLES.index(style) if style in STYLES else 99])
    radius = rng.uniform(17.0, 23.0)
    cx, cy = rng.uniform(SIZE / 2 - 5, SIZE / 2 + 5, size=2)
    mask = shape_mask(shape, cx, cy, radius)
    image = np.broadcast_to(np.array(BACKGROUND, np.float32), (SIZE, SIZE, 3)).copy()
    image[mask] = style_fill(style, rng)[mask]
    return Sample(image.round().clip(0, 255).astype(np.uint8), mask, shape, style)


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (64, 64, 3) uint8
    masks: tuple  # one (64, 64) bool mask per object
    objects: tuple  # ((shape, style), ...) in the order of masks


def render_scene(objects, seed: int) -> Scene:
    """Two objects side by side (left / right or top / bottom, the side chosen by the seed), radius 11-14 px each."""
    rng = np.random.default_rng([seed, 7_777, *(SHAPES.index(h) * 10 + STYLES.index(t) for h, t in objects)])
    horizontal = bool(rng.integers(0, 2))
    image = np.broadcast_to(np.array(BACKGROUND, np.float32), (SIZE, SIZE, 3)).copy()
    masks = []
    for half, (shape, style) in zip(rng.permutation(len(objects)), objects):
        along, across = SIZE / 4 + half * SIZE / 2 + rng.uniform(-2.5, 2.5), SIZE / 2 + rng.uniform(-9, 9)
        cx, cy = (along, across) if horizontal else (across, along)
        radius = rng.uniform(11.0, 14.0)
        mask = shape_mask(shape, cx, cy, radius)
        image[mask] = style_fill(style, rng, (cy - radius, cy + radius))[mask]
        masks.append(mask)
    return Scene(image.round().clip(0, 255).astype(np.uint8), tuple(masks), tuple(objects))


def render_wide_scene(objects, seed: int, landscape: bool | None = None) -> Scene:
    """Two objects on a canvas of two 64x64 halves, each drawn as a single object is (radius 17-23 px, centre within
    5 px of its half's): landscape (64 high, 128 wide) or portrait (128 x 64), chosen by the seed unless given; which
    object takes the first half is chosen by the seed too.

    At 64x64 two objects fit only at radius 11-14 px, about three cells of the 8x8 latent, where the world's VAE
    already loses a fifth of the shapes; on the wider canvas each object keeps a single object's size in the latent."""
    rng = np.random.default_rng([seed, 8_888, *(SHAPES.index(h) * 10 + STYLES.index(t) for h, t in objects)])
    chosen_landscape = bool(rng.integers(0, 2))
    landscape = chosen_landscape if landscape is None else landscape
    order = rng.permutation(len(objects))
    halves = [render(shape, style, int(rng.integers(0, 2**31))) for shape, style in (objects[i] for i in order)]
    axis = 1 if landscape else 0
    image = np.concatenate([half.image for half in halves], axis=axis)
    empty = np.zeros_like(halves[0].mask)
    placed = [np.concatenate([h.mask, empty] if k == 0 else [empty, h.mask], axis=axis) for k, h in enumerate(halves)]
    masks = [placed[k] for k in np.argsort(order)]  # back in the objects' order: argsort inverts the permutation
    return Scene(image, tuple(masks), tuple(objects))


def reading_order(scene: Scene) -> tuple[int, ...]:
    """The scene's objects (indices into scene.objects) as a reader meets them: left to right when they sit side by
    side, top to bottom when they sit one above the other (the axis along which their centres lie further apart)."""
    centres = [np.argwhere(mask).mean(axis=0) for mask in scene.masks]  # (row, column) each
    spread = np.ptp(np.stack(centres), axis=0)
    axis = 1 if spread[1] >= spread[0] else 0
    return tuple(sorted(range(len(centres)), key=lambda i: centres[i][axis]))


def object_pairs(count: int, shapes=BASE_SHAPES, styles=BASE_STYLES, seed: int = 0) -> list[tuple]:
    """``count`` pairs of objects with different shapes and different styles, deterministic from seed."""
    rng = np.random.default_rng([seed, 4_242])
    pairs = []
    for _ in range(count):
        first, second = rng.choice(len(shapes), 2, replace=False), rng.choice(len(styles), 2, replace=False)
        pairs.append(((shapes[first[0]], styles[second[0]]), (shapes[first[1]], styles[second[1]])))
    return pairs


def two_object_scenes(count: int, shapes=BASE_SHAPES, styles=BASE_STYLES, seed: int = 0, wide: bool = False) -> list[Scene]:
    """``count`` scenes of two objects with different shapes and different styles, deterministic from seed: 64x64
    (render_scene) or on the wide canvas (render_wide_scene)."""
    draw = render_wide_scene if wide else render_scene
    return [draw(objects, seed * 100_003 + i) for i, objects in enumerate(object_pairs(count, shapes, styles, seed))]


def dataset(shapes=BASE_SHAPES, styles=BASE_STYLES, per_pair: int = 8, seed: int = 0) -> list[Sample]:
    """Every (shape, style) pair, per_pair samples each, deterministic from seed."""
    return [render(shape, style, seed * 100_003 + i) for shape in shapes for style in styles for i in range(per_pair)]


def contact_sheet(samples: list[Sample], columns: int) -> np.ndarray:
    rows = math.ceil(len(samples) / columns)
    sheet = np.full((rows * (SIZE + 2), columns * (SIZE + 2), 3), 255, np.uint8)
    for i, sample in enumerate(samples):
        r, c = divmod(i, columns)
        sheet[r * (SIZE + 2):r * (SIZE + 2) + SIZE, c * (SIZE + 2):c * (SIZE + 2) + SIZE] = sample.image
    return sheet


if __name__ == "__main__":
    import sys

    from PIL import Image

    target = sys.argv[1] if len(sys.argv) > 1 else "contact_sheet.png"
    samples = [render(shape, style, 1) for shape in SHAPES for style in STYLES]
    Image.fromarray(contact_sheet(samples, len(STYLES))).save(target)
    print(f"{len(SHAPES)} shapes (rows; last two held out) x {len(STYLES)} styles (columns; last two held out): {target}")
