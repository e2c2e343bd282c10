"""Image to Prompt Vectors (IPL inference): an image's CLIP embedding -> n_ctx prompt vectors in a prompt."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..core.ipl import LatentMapper, load_mapper
from . import comfy_compat as cc
from .common import CATEGORY, node_id

MARKER = "iplplaceholdervectors"


def check_mapper_fits(mapper: LatentMapper, clip_vision, clip, name: str) -> None:
    vision, widths = cc.clip_vision_width(clip_vision), cc.token_widths(clip)
    if mapper.in_dim != vision:
        raise ValueError(f"{name}: the mapper takes {mapper.in_dim}-wide image embeddings, this CLIP_VISION gives {vision}")
    if mapper.token_dims != widths:
        raise ValueError(f"{name}: the mapper makes vectors for text encoders {mapper.token_dims}, this CLIP has {widths}")


def conditioning_with_vectors(clip, template: str, per_image: list[dict[str, torch.Tensor]]) -> list:
    """One conditioning entry holding a batch: row b is the template with image b's vectors."""
    conds, pooled = [], []
    for vectors in per_image:
        cond, pool = cc.encode_tokens(clip, cc.insert_prompt_vectors(clip, template, MARKER, vectors))
        conds.append(cond)
        pooled.append(pool)
    extras = {"pooled_output": torch.cat(pooled)} if pooled[0] is not None else {}
    return [[torch.cat(conds), extras]]


class ImageToPromptVectors(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("ImageToPromptVectors"),
            display_name="Image to Prompt Vectors",
            category=CATEGORY,
            description="IPL: a latent mapper turns each image's CLIP vision embedding into n_ctx prompt vectors that "
                        "replace {} in the template at the text encoders' input embeddings (like textual inversion). "
                        "A batch of images gives a batch of conditionings.",
            inputs=[
                io.Image.Input("image", tooltip="One image or a batch; each gets its own prompt vectors."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the mapper was trained with."),
                io.Combo.Input("mapper_name", options=cc.mapper_file_names(),
                               tooltip=f"A mapper file from models/{cc.MAPPER_FOLDER} (made by Train Prompt Mapper)."),
                io.Clip.Input("clip", tooltip="The text encoder(s) that encode the prompt."),
                io.String.Input("template", default="a {} photo of a dog",
                                tooltip="The prompt; {} is replaced by the image's prompt vectors."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning",
                                            tooltip="Batch of conditionings, one row per image.")],
        )

    @classmethod
    def execute(cls, image, clip_vision, mapper_name: str, clip, template: str) -> io.NodeOutput:
        mapper, _ = load_mapper(cc.mapper_file_path(mapper_name))
        check_mapper_fits(mapper, clip_vision, clip, mapper_name)
        with torch.no_grad():
            vectors = mapper.split(mapper(cc.clip_vision_embeds(clip_vision, image)))
        per_image = [{key: v[b] for key, v in vectors.items()} for b in range(image.shape[0])]
        return io.NodeOutput(conditioning_with_vectors(clip, template, per_image))
