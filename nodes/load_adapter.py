"""Load Adapter nodes: read a LoRA-style file in any layout the pack knows into an ADAPTER."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.adapter import ROLES
from ..core.adapter_file import check_finite, read_safetensors
from ..core.blocks import select_b_lora_part
from ..core.formats import adapter_from_tensors
from . import comfy_compat
from .common import PackNode, schema, strength_input
from .sockets import AdapterSocket, LoraModelSocket

PARTS = {"whole file": None, "B-LoRA content block": "content", "B-LoRA style block": "style"}
ROLE_FROM_FILE = "from file"
LORA_MODEL_SOURCE = "LORA_MODEL"  # the adapter's source name in reports when it came from a socket, not a file


def role_input() -> io.Combo.Input:
    return io.Combo.Input("role", options=[ROLE_FROM_FILE, *ROLES], default=ROLE_FROM_FILE,
                          tooltip="What the adapter carries. 'from file' reads the role saved in the file's metadata "
                                  "(else generic).")


class LoadAdapter(PackNode):
    """Read an adapter file: kohya, diffusers / PEFT (also B4M's doubled unet. prefix), ComfyUI generic, B-LoRA /
    ConsisLoRA block splits and QR-LoRA files, from the loras folder or models/content_style_adapters. Every kind
    ComfyUI's LoraLoader reads is kept (LoRA, LoHa, LoKr, OFT, BOFT, GLoRA, Tucker, DoRA, weight / bias / norm diffs,
    as ComfyUI's Train LoRA node saves them); keys of no known kind are listed in the reports."""

    ROLE: str | None = None  # fixed by the content / style variants
    NAME, TITLE = "LoadAdapter", "Load Adapter"

    @classmethod
    def define_schema(cls) -> io.Schema:
        roles = [] if cls.ROLE else [role_input()]
        return schema(cls, cls.NAME, cls.TITLE, inputs=[
                io.Combo.Input("adapter_name", options=comfy_compat.adapter_file_names(),
                               tooltip="Adapter file (safetensors) in the loras folder or the pack's own folder."),
                strength_input("strength", "How strongly this adapter changes the model when applied or merged."),
                io.Combo.Input("part", options=list(PARTS), default="whole file",
                               tooltip="Take the whole file, or only the B-LoRA content block (up_blocks.0.attentions.0 "
                                       "= output_blocks.0.1) or style block (up_blocks.0.attentions.1 = output_blocks.1.1); "
                                       "a file from Train ConsisLoRA uses the block split it records."),
                *roles,
            ],
            outputs=[AdapterSocket.Output(display_name="adapter", tooltip="The adapter, ready to apply, merge or inspect.")],
        )

    @classmethod
    def execute(cls, adapter_name: str, strength: float, part: str, role: str = ROLE_FROM_FILE) -> io.NodeOutput:
        tensors, metadata = read_safetensors(comfy_compat.adapter_file_path(adapter_name))
        chosen_role = cls.ROLE or (None if role == ROLE_FROM_FILE else role)
        adapter = adapter_from_tensors(tensors, metadata, source=adapter_name, role=chosen_role)
        if PARTS[part] is not None:
            adapter = select_b_lora_part(adapter, PARTS[part])
        return io.NodeOutput(adapter.replace(strength=strength))


class LoadContentAdapter(LoadAdapter):
    ROLE = "content"
    NAME, TITLE = "LoadContentAdapter", "Load Content Adapter"


class LoadStyleAdapter(LoadAdapter):
    ROLE = "style"
    NAME, TITLE = "LoadStyleAdapter", "Load Style Adapter"


class AdapterFromLoraModel(PackNode):
    """Take ComfyUI's LORA_MODEL (what its Train LoRA node outputs and Save LoRA Weights / Load LoRA Model take) as an
    adapter, without a file in between: every kind Train LoRA makes (LoRA, LoHa, LoKr, OFT, with its bias and norm
    diffs) is kept, read exactly as Load Adapter reads the file Save LoRA Weights would write."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "AdapterFromLoraModel", "Adapter from LoRA Model", inputs=[
                LoraModelSocket.Input("lora", tooltip="A LORA_MODEL, e.g. the lora output of ComfyUI's Train LoRA node "
                                                      "(ComfyUI's own type; hosts without Train LoRA have no source of "
                                                      "it)."),
                strength_input("strength", "How strongly this adapter changes the model when applied or merged."),
                role_input(),
            ],
            outputs=[AdapterSocket.Output(display_name="adapter", tooltip="The adapter, ready to apply, merge, inspect "
                                                                         "or save.")],
        )

    @classmethod
    def execute(cls, lora: dict, strength: float, role: str = ROLE_FROM_FILE) -> io.NodeOutput:
        tensors = {key: tensor.detach() for key, tensor in lora.items()}  # Train LoRA hands out its trained parameters
        check_finite(tensors, LORA_MODEL_SOURCE)
        adapter = adapter_from_tensors(tensors, {}, source=LORA_MODEL_SOURCE,
                                       role=None if role == ROLE_FROM_FILE else role)
        return io.NodeOutput(adapter.replace(strength=strength))
