"""Training images and their captions: sized for the model, one caption each, the trigger word filled in.

    captions text          images   captions
    "a {trigger} dog"      3        the same caption for all three
    "a\\nb\\nc"               3        one per line, in image order
    "a\\nb"                 3        error: 2 captions for 3 images

Images are resized (shorter side to the training size, antialiased) and centre-cropped to a square.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TRIGGER = "{trigger}"


@dataclass(frozen=True)
class TrainingImages:
    """The TRAINING_DATA value: (N, S, S, 3) images in [0, 1], one caption per image, repeats per epoch."""

    images: torch.Tensor
    captions: tuple[str, ...]
    repeats: int = 1
    trigger: str = ""

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.shape[0] != len(self.captions):
            raise ValueError(f"{len(self.captions)} captions for images of shape {tuple(self.images.shape)}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def size(self) -> int:
        return self.images.shape[1]

    def describe(self) -> dict:
        return {"images": len(self.captions), "repeats": self.repeats, "resolution": self.size,
                "trigger": self.trigger, "captions": sorted(set(self.captions))}


@dataclass(frozen=True)
class TrainingLatents:
    """Training data as ComfyUI's own Train LoRA node takes it: latents (VAE space, (N, C, h, w)) and one
    CONDITIONING each, encoded outside the trainer. For models whose text encoder or VAE is too large to keep loaded
    beside training (FLUX's T5-XXL), or that the graph encodes once. ``captions`` record what the conditioning says
    ('' where unknown); ``pixel_scale`` is the VAE's compression, for the preview size."""

    latents: torch.Tensor
    conditioning: tuple
    captions: tuple[str, ...]
    repeats: int = 1
    trigger: str = ""
    pixel_scale: int = 8

    def __post_init__(self):
        if self.latents.ndim != 4 or self.latents.shape[0] != len(self.conditioning):
            raise ValueError(f"{len(self.conditioning)} conditionings for latents of shape {tuple(self.latents.shape)}; "
                             f"give one per latent, or one for all")
        if len(self.captions) != len(self.conditioning):
            raise ValueError(f"{len(self.captions)} captions for {len(self.conditioning)} conditionings")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")

    @property
    def size(self) -> int:
        return self.latents.shape[-1] * self.pixel_scale

    def describe(self) -> dict:
        return {"latents": len(self.captions), "latent_shape": list(self.latents.shape[1:]), "repeats": self.repeats,
                "trigger": self.trigger, "captions": sorted(set(self.captions))}


def training_latents(latents: torch.Tensor, conditioning: list, captions: str, repeats: int = 1,
                     trigger: str = "") -> TrainingLatents:
    """Latents with their conditioning: one CONDITIONING entry per latent (in order), or one entry for all."""
    count = latents.shape[0]
    if len(conditioning) not in (1, count):
        raise ValueError(f"conditioning has {len(conditioning)} entries for {count} latents; give one per latent (in "
                         f"order) or one for all")
    entries = list(conditioning) * count if len(conditioning) == 1 else list(conditioning)
    texts = [fill_trigger(c, trigger) for c in split_captions(captions, count)]
    return TrainingLatents(latents.float(), tuple([entry] for entry in entries), tuple(texts), repeats, trigger.strip())


def resize_and_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, C) -> (size, size, C): shorter side scaled to ``size`` (area-correct, antialiased), centre crop."""
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    pixels = image[..., :3].movedim(-1, 0)[None].float()
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return pixels[0, :, top:top + size, left:left + size].movedim(0, -1)


def split_captions(text: str, count: int, source: str = "captions") -> list[str]:
    """One caption per image from a text: a single line for all images, or one line per image."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return [lines[0] if lines else ""] * count
    if len(lines) != count:
        raise ValueError(f"{source}: {len(lines)} caption lines for {count} images; give one line per image or one "
                         f"line for all")
    return lines


def fill_trigger(caption: str, trigger: str) -> str:
    """Replace the {trigger} placeholder; a caption with a placeholder but no trigger word is an error."""
    if TRIGGER in caption and not trigger.strip():
        raise ValueError(f"the caption {caption!r} has the {TRIGGER} placeholder but no trigger word is set")
    return caption.replace(TRIGGER, trigger.strip())


def training_images(images: list[torch.Tensor], captions: list[str], size: int, repeats: int = 1,
                    trigger: str = "") -> TrainingImages:
    """Images (each (H, W, C) or (1, H, W, C)) sized to ``size`` with their captions, trigger filled in."""
    if not images:
        raise ValueError("no training images: connect images or name a folder of images")
    if len(images) != len(captions):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    sized = torch.stack([resize_and_crop(image[0] if image.ndim == 4 else image, size) for image in images])
    return TrainingImages(sized, tuple(fill_trigger(c, trigger) for c in captions), repeats, trigger.strip())
