"""Apply Adapters: patch a MODEL (and optionally a CLIP) with one to four ADAPTERs."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.blocks import parse_block_strengths
from .model_binding import apply_patch_groups, patches_by_strength
from .common import PackNode, schema
from .sockets import AdapterSocket

EXTRA_SLOTS = ("adapter_2", "adapter_3", "adapter_4")


class ApplyAdapters(PackNode):
    """Apply one or more adapters, each with the strength set on its loader, through ComfyUI's own key map and weight
    patches (lowvram and quantized models keep working). The input model is never modified."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ApplyAdapters", "Apply Adapters", inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch. A patched clone is returned."),
                AdapterSocket.Input("adapter", tooltip="An adapter from a Load Adapter node (or a merge / training node)."),
                io.String.Input("block_strengths", default="", multiline=True,
                                tooltip="Optional per-block multipliers, e.g. 'input_blocks.4=0.5, output_blocks=0'. "
                                        "Names are ComfyUI's UNet blocks (input_blocks.N, middle_block, output_blocks.N) "
                                        "or a prefix of them; the most specific entry wins. Empty: 1 everywhere."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoder, patched with the adapters' text-encoder modules."),
                *[AdapterSocket.Input(slot, optional=True, tooltip="Another adapter, applied on top (patches add up).")
                  for slot in EXTRA_SLOTS],
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model with the adapters patched in."),
                io.Clip.Output(display_name="clip", tooltip="The patched text encoder (None when no CLIP was given)."),
                io.String.Output(display_name="report",
                                 tooltip="Per adapter: how many modules mapped and of which kinds; every module or file "
                                         "key not used, with the reason."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter, block_strengths: str = "", clip=None, **extra) -> io.NodeOutput:
        adapters = [adapter, *[extra[s] for s in EXTRA_SLOTS if extra.get(s) is not None]]
        groups, report = patches_by_strength(adapters, model, clip, parse_block_strengths(block_strengths))
        model, clip = apply_patch_groups(model, clip, groups)
        return io.NodeOutput(model, clip, report)
