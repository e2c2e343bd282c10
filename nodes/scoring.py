"""The ComfyUI half of the scores: which encoder is which, embeddings from ComfyUI's own encoders, input checks.

Shared by Score Content / Style / Prompt, the strength sweeps and bench/score_folder.py (no node class here).

Preprocessing is the encoder's own, through ComfyUI: ClipVisionModel.encode_image runs
comfy.clip_vision.clip_preprocess with the size, mean and std of the loaded model's config: the shorter side is
resized to the encoder's size (bicubic, antialiased), the centre square cropped, values rounded to 8-bit levels,
then normalised.

- CLIP ViT: 224 px (336 for the 336 variants), CLIP's mean/std; the embedding is ``image_embeds``, the
  projected pooled token (the image feature CLIP's text score is defined on).
- DINOv2: 518 px (37 x 37 patches of 14; ComfyUI's DINOv2 has fixed position embeddings, so it cannot take the
  224 crop of Hugging Face's processor), ImageNet mean/std; the embedding is the CLS token after the final
  layer norm (Hugging Face's pooler_output).
- SigLIP: refused. ComfyUI gives its per-patch features without SigLIP's attention-pooling head, so there is
  no single image embedding to compare.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..core.scores import reference_scores, text_scores
from .clip_features import clip_vision_embeds, clip_vision_width, looks_loaded, projected_text_features, text_encoders
from .comfy_compat import clip_vision_kind as encoder_kind

KIND_NAMES = {"dinov2": "DINOv2", "clip": "CLIP ViT", "siglip": "SigLIP", "clip-unprojected": "CLIP ViT without "
              "visual projection", "unknown": "unknown"}
WHY = {"dinov2": "the content score is the DINOv2 cosine of the papers: load a DINOv2 (large or giant) with Load "
                 "CLIP Vision",
       "clip": "the style and prompt scores are CLIP cosines: load a CLIP ViT (ViT-L/14, ViT-H, ViT-bigG) with "
               "Load CLIP Vision"}


@dataclass(frozen=True)
class Reference:
    encoder: object  # a CLIP_VISION
    embeds: torch.Tensor  # (M, D) reference image embeddings, or (1, D) the prompt's text embedding


@dataclass(frozen=True)
class Scorer:
    """Reference embeddings computed once; ``score`` embeds generated images and compares."""

    content: Reference | None = None
    style: Reference | None = None
    prompt: Reference | None = None  # its encoder is the style encoder (CLIP image side)

    def score(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{metric: (N,) per-image score} for the metrics this scorer was built for (a batch or a list of batches)."""
        scores = {}
        if self.content is not None:
            scores["content"] = reference_scores(embed(self.content.encoder, images), self.content.embeds)
        clip_side = self.style or self.prompt
        if clip_side is not None:
            embeds = embed(clip_side.encoder, images)
            if self.style is not None:
                scores["style"] = reference_scores(embeds, self.style.embeds)
            if self.prompt is not None:
                scores["prompt"] = text_scores(embeds, self.prompt.embeds)
        return scores


def check_batch(name: str, images) -> None:
    """An IMAGE batch (B, H, W, C), or a list of them (sizes may differ), with at least one image."""
    batches = images if isinstance(images, (list, tuple)) else [images]
    for batch in batches or [None]:
        if batch is None or batch.ndim != 4 or min(batch.shape[:3]) == 0:
            shape = None if batch is None else tuple(batch.shape)
            raise ValueError(f"{name}: the image batch is empty (shape {shape}); connect at least one image")


def embed(encoder, images) -> torch.Tensor:
    """(N, D) embeddings of an IMAGE batch or of a list of batches of different sizes, in order."""
    batches = images if isinstance(images, (list, tuple)) else [images]
    return torch.cat([clip_vision_embeds(encoder, batch) for batch in batches])


def require_kind(name: str, encoder, kind: str) -> None:
    found = encoder_kind(encoder)
    if found != kind:
        raise ValueError(f"{name}: this CLIP_VISION is a {KIND_NAMES[found]} model; {WHY[kind]}")


def check_inputs(content_images, content_encoder, style_images, style_encoder, prompt: str, clip) -> None:
    """Every rule names the input to fix; encoders are checked for their kind."""
    for name, images in (("content_images", content_images), ("style_images", style_images)):
        if images is not None:
            check_batch(name, images)
    for images, encoder, role in ((content_images, content_encoder, "content"), (style_images, style_encoder, "style")):
        if images is not None and encoder is None:
            raise ValueError(f"{role}_encoder: connect a {KIND_NAMES['dinov2' if role == 'content' else 'clip']} "
                             f"CLIP_VISION to score against {role}_images (or disconnect {role}_images)")
    if content_encoder is not None and content_images is None:
        raise ValueError("content_images: connect the content reference images to score with content_encoder")
    if style_encoder is not None and style_images is None and not prompt.strip():
        raise ValueError("style_images: connect the style reference images (or write a prompt) to use style_encoder")
    if prompt.strip() and clip is None:
        raise ValueError("clip: the prompt score needs a CLIP text encoder with a text projection (Load CLIP); "
                         "connect one or clear prompt")
    if clip is not None and not prompt.strip():
        raise ValueError("prompt: empty; write the prompt to score the images against (or disconnect clip)")
    if prompt.strip() and style_encoder is None:
        raise ValueError("style_encoder: the prompt score compares CLIP image and text features; connect a CLIP ViT "
                         "CLIP_VISION as style_encoder")
    if content_images is None and style_encoder is None:
        raise ValueError("nothing to score: connect content_images + content_encoder, style_images + style_encoder, "
                         "or a prompt + clip (with style_encoder)")
    if content_encoder is not None:
        require_kind("content_encoder", content_encoder, "dinov2")
    if style_encoder is not None:
        require_kind("style_encoder", style_encoder, "clip")


def build_scorer(content_images=None, content_encoder=None, style_images=None, style_encoder=None, prompt: str = "",
                 clip=None) -> Scorer:
    """Check the inputs and embed the references (and the prompt) once."""
    check_inputs(content_images, content_encoder, style_images, style_encoder, prompt, clip)
    content = style = text = None
    if content_images is not None:
        content = Reference(content_encoder, embed(content_encoder, content_images))
    if style_images is not None:
        style = Reference(style_encoder, embed(style_encoder, style_images))
    if prompt.strip():
        text = Reference(style_encoder, prompt_embedding(clip, prompt, clip_vision_width(style_encoder)))
    return Scorer(content, style, text)


def prompt_embedding(clip, prompt: str, width: int) -> torch.Tensor:
    """(1, width) projected text feature of the prompt (first 77-token chunk, as CLIP itself), from the CLIP text
    encoder whose projection width matches the image encoder's."""
    encoders = text_encoders(clip)
    widths = {key: encoder.transformer.text_projection.weight.shape[0] for key, encoder in encoders.items()
              if hasattr(encoder.transformer, "text_projection")}
    matching = [key for key, found in widths.items() if found == width]
    if not matching:
        raise ValueError(f"clip: its CLIP text encoders project to {widths or 'nothing'}, the style_encoder's image "
                         f"embeddings are {width} wide; use the text encoder of the same CLIP model (e.g. CLIP-L "
                         f"text with ViT-L/14 vision)")
    key = matching[0]
    if not looks_loaded(encoders[key].transformer.text_projection.weight):
        raise ValueError("clip: its text encoder has no text projection (SD1.5 checkpoints carry none), so text and "
                         "image features are not in one CLIP space; load the text encoder with Load CLIP from a file "
                         "that includes text_projection")
    with torch.no_grad():
        return projected_text_features(clip, key, [clip.tokenize(prompt)[key]], require_projection=False).detach()


def score_inputs() -> list:
    """The reference, encoder and prompt inputs of every node that scores (same names, so errors name them)."""
    return [
        io.Image.Input("content_images", optional=True,
                       tooltip="Content reference images (any size; one batch). Each generated image is compared with "
                               "every one of them and the cosines are averaged."),
        io.ClipVision.Input("content_encoder", optional=True,
                            tooltip="A DINOv2 (large or giant) from Load CLIP Vision: the content score is the DINOv2 "
                                    "cosine (CLS token, 518 px centre crop, ImageNet normalisation)."),
        io.Image.Input("style_images", optional=True,
                       tooltip="Style reference images (any size; one batch), compared like content_images."),
        io.ClipVision.Input("style_encoder", optional=True,
                            tooltip="A CLIP ViT (ViT-L/14, ViT-H, ViT-bigG) from Load CLIP Vision: the style score is "
                                    "the cosine of projected CLIP image embeddings; it also embeds the images for the "
                                    "prompt score."),
        io.Clip.Input("clip", optional=True,
                      tooltip="A CLIP text encoder with its text projection (Load CLIP; SD1.5 checkpoints carry none), "
                              "of the same CLIP model as style_encoder: the prompt score's text side."),
        io.String.Input("prompt", default="", optional=True,
                        tooltip="The prompt to score the images against (CLIP text score: cosine of projected text and "
                                "image features). Empty: no prompt score."),
    ]


def preprocessing(clip_vision) -> str:
    """What encode_image does to an image before this encoder sees it (for reports)."""
    mean = ", ".join(f"{v:.3f}" for v in clip_vision.image_mean)
    std = ", ".join(f"{v:.3f}" for v in clip_vision.image_std)
    return (f"{KIND_NAMES[encoder_kind(clip_vision)]}: shorter side to {clip_vision.image_size} px (bicubic, "
            f"antialiased), centre crop {clip_vision.image_size}x{clip_vision.image_size}, 8-bit rounding, "
            f"mean ({mean}), std ({std})")
