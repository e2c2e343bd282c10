"""IPL: image-specific prompt learning (Guo et al., CVPR 2023), adapted to diffusion models.

A latent mapper turns an image's CLIP vision embedding into n_ctx prompt vectors that replace a
placeholder in a prompt at the text encoder's input embeddings (the way textual inversion enters):

    PixelNorm -> 3 x (EqualLinear 512, leaky ReLU 0.2 with gain √2, lr multiplier 0.01) -> Linear -> n_ctx x D

D is the sum of the text encoders' token widths (768 for SD1.5's CLIP-L; 768 + 1280 for SDXL), split
per encoder by ``split``. EqualLinear is StyleGAN's: weights stored as N(0, 1/lr_mul²) and scaled by
lr_mul / √in at run time, which is what "learning-rate multiplier" means there.

Losses: stage 1 trains the mapper with a symmetric contrastive loss between image features and their
source prompts plus a domain regulariser; stage 2 adapts the generator with a directional loss.
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F

from .adapter_file import AdapterFileError, read_safetensors, write_safetensors
from .training import Optimiser, optimise
from . import metadata as META

MAPPER_KIND = META.MAPPER_KIND
ADAM = Optimiser(name="adam", weight_decay=0.0)  # IPL trains with plain Adam (the paper's setting)


class PixelNorm(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class EqualLinear(torch.nn.Module):
    def __init__(self, in_dim: int, out_dim: int, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = torch.nn.Parameter(torch.zeros(out_dim))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_dim), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * math.sqrt(2) if self.activate else out


class LatentMapper(torch.nn.Module):
    def __init__(self, in_dim: int, n_ctx: int, token_dims: dict[str, int], hidden: int = 512, layers: int = 3,
                 lr_mul: float = 0.01):
        super().__init__()
        if n_ctx < 1 or not token_dims:
            raise ValueError(f"n_ctx must be >= 1 and token_dims non-empty, got n_ctx={n_ctx}, token_dims={token_dims}")
        self.in_dim, self.n_ctx, self.token_dims = in_dim, n_ctx, dict(token_dims)
        self.hidden, self.layers, self.lr_mul = hidden, layers, lr_mul
        blocks: list[torch.nn.Module] = [PixelNorm()]
        width = in_dim
        for _ in range(layers):
            blocks.append(EqualLinear(width, hidden, lr_mul=lr_mul, activate=True))
            width = hidden
        blocks.append(torch.nn.Linear(width, n_ctx * sum(token_dims.values())))
        self.net = torch.nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) image embeddings -> (B, n_ctx, D) prompt vectors."""
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"the mapper takes (batch, {self.in_dim}) image embeddings, got {tuple(features.shape)}")
        return self.net(features.float()).reshape(features.shape[0], self.n_ctx, -1)

    def split(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per text encoder: {'l': (B, n_ctx, 768), ...} in token_dims order."""
        return dict(zip(self.token_dims, vectors.split(list(self.token_dims.values()), dim=-1)))

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "n_ctx": self.n_ctx, "token_dims": self.token_dims, "hidden": self.hidden,
                "layers": self.layers, "lr_mul": self.lr_mul}


def save_mapper(mapper: LatentMapper, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                overwrite: bool = False):
    meta = {META.KIND: MAPPER_KIND, META.MAPPER_CONFIG: json.dumps(mapper.config()), **(metadata or {})}
    return write_safetensors(path, dict(mapper.state_dict()), meta, overwrite=overwrite)


def load_mapper(path: str | os.PathLike) -> tuple[LatentMapper, dict[str, str]]:
    tensors, metadata = read_safetensors(path)
    name = os.path.basename(str(path))
    if metadata.get(META.KIND) != MAPPER_KIND or META.MAPPER_CONFIG not in metadata:
        raise AdapterFileError(f"{name}: not a prompt mapper file (no csa.kind={MAPPER_KIND} metadata)")
    mapper = LatentMapper(**json.loads(metadata[META.MAPPER_CONFIG]))
    missing = set(mapper.state_dict()) - set(tensors)
    if missing:
        raise AdapterFileError(f"{name}: mapper tensors missing: {sorted(missing)[:4]}")
    try:
        mapper.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise AdapterFileError(f"{name}: tensors do not fit the mapper config: {error}") from error
    return mapper.eval(), metadata


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: float = 100.0):
    """Symmetric CLIP loss: image i must match text i among the batch, and the reverse."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def domain_regularizer(target_text_features: torch.Tensor, target_template_features: torch.Tensor):
    """1 - cos(each image-specific target prompt's features, the mean of the target label's template features)."""
    anchor = F.normalize(F.normalize(target_template_features.float(), dim=-1).mean(0), dim=-1)
    return (1 - F.normalize(target_text_features.float(), dim=-1) @ anchor).mean()


def directional_loss(source_images: torch.Tensor, target_images: torch.Tensor, source_texts: torch.Tensor,
                     target_texts: torch.Tensor):
    """1 - cos(ΔI, ΔT), per sample, averaged: ΔI = E_I(target) - E_I(source), ΔT likewise for the prompts."""
    delta_image = target_images.float() - source_images.float()
    delta_text = target_texts.float() - source_texts.float()
    return (1 - F.cosine_similarity(delta_image, delta_text, dim=-1)).mean()


def replace_marker(chunk: list, marker_ids: list[int], vectors, pad: int, template: str) -> list:
    """One 77-token chunk of (token, weight, ...) entries with the marker's token ids replaced by one entry per
    prompt vector; the chunk keeps its length (trailing padding gives way, one end / pad token stays).

    Returns the chunk itself when the marker is not in it.
    """
    ids = [e[0] if isinstance(e[0], int) else None for e in chunk]
    starts = [i for i in range(len(ids) - len(marker_ids) + 1) if ids[i:i + len(marker_ids)] == marker_ids]
    if not starts:
        return chunk
    start, extra = starts[0], len(vectors) - len(marker_ids)
    trailing = 0
    while trailing < len(chunk) and chunk[len(chunk) - 1 - trailing][0] == pad:
        trailing += 1
    if trailing - 1 < extra:  # keep one end / pad token
        raise ValueError(f"the prompt {template!r} is too long to take {len(vectors)} prompt vectors")
    entry = chunk[start]
    inserted = [(vector, *entry[1:]) for vector in vectors]
    out = chunk[:start] + inserted + chunk[start + len(marker_ids):]
    return out[: len(chunk)] if extra >= 0 else out + [(pad, *entry[1:])] * (-extra)


TEMPLATES = ("a photo of a {}.", "a rendering of a {}.", "a picture of a {}.", "a close-up photo of a {}.",
             "a bright photo of a {}.", "a painting of a {}.", "a good photo of a {}.", "a cropped photo of a {}.")


def train_mapper(mapper: LatentMapper, image_embeds: torch.Tensor, encode_prompts, source_label: str,
                 target_label: str, target_template_features: torch.Tensor, iterations: int, lr: float,
                 batch_size: int, seed: int, regularizer_weight: float = 1.0, on_step=None) -> list[float]:
    """IPL stage 1: train the mapper only.

    encode_prompts(vectors (b, n_ctx, D), label) -> (b, P) text features, differentiable in the vectors:
    the prompt [SOS][V1..Vn][label][EOS] through the frozen text encoder. Loss per step: symmetric contrastive
    loss between the batch's image embeddings and their source prompts, plus regularizer_weight times the
    domain regulariser of their target prompts against the target label's template features.
    """
    count = image_embeds.shape[0]
    if count < 2:
        raise ValueError(f"the contrastive loss needs at least 2 source images, got {count}")
    generator = torch.Generator().manual_seed(seed)

    def step_loss(step: int, micro: int) -> torch.Tensor:
        batch = torch.randperm(count, generator=generator)[:max(2, min(batch_size, count))]
        vectors = mapper(image_embeds[batch])
        loss = contrastive_loss(image_embeds[batch], encode_prompts(vectors, source_label))
        if regularizer_weight:
            target = encode_prompts(vectors, target_label)
            loss = loss + regularizer_weight * domain_regularizer(target, target_template_features)
        return loss

    return optimise(dict(mapper.named_parameters()), step_loss, iterations, lambda step: lr, ADAM,
                    on_step=on_step).losses
