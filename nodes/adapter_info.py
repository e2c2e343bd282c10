"""Adapter Info: what an adapter holds and how it fits a model, as text."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.adapter import Adapter
from ..core.blocks import touched_blocks
from .model_binding import bind_to_model, describe_binding
from .common import PackNode, schema
from .sockets import AdapterSocket


def describe_adapter(adapter: Adapter) -> str:
    lines = [
        f"{adapter.source or '(unsaved adapter)'}",
        f"role {adapter.role} · method {adapter.method} · base {adapter.base} · strength {adapter.strength:g}",
        f"modules {len(adapter.module_names)} · kinds {', '.join(f'{k} {n}' for k, n in adapter.kinds.items())} · "
        f"ranks {adapter.ranks} · parameters {adapter.parameter_count:,} · size {adapter.size_bytes / 2**20:.2f} MiB",
        f"blocks touched: {', '.join(sorted(touched_blocks(adapter.module_names)))}",
    ]
    if adapter.ignored_keys:
        lines.append(f"keys not used ({len(adapter.ignored_keys)}): " +
                     ", ".join(f"{key} ({reason})" for key, reason in adapter.ignored_keys.items()))
    return "\n".join(lines)


class AdapterInfo(PackNode):
    """Show an adapter's modules, kinds (LoRA, LoHa, LoKr, OFT, diffs, ...), ranks, blocks, parameter count, size, role
    and method, and the file keys it does not use; with a model connected, also which modules match it."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "AdapterInfo", "Adapter Info", output_node=True, inputs=[
                AdapterSocket.Input("adapter", tooltip="The adapter to describe."),
                io.Model.Input("model", optional=True, tooltip="Optional model to match the adapter's modules against."),
                io.Clip.Input("clip", optional=True, tooltip="Optional text encoder, for text-encoder modules."),
            ],
            outputs=[io.String.Output(display_name="info", tooltip="The description, as text.")],
        )

    @classmethod
    def execute(cls, adapter: Adapter, model=None, clip=None) -> io.NodeOutput:
        text = describe_adapter(adapter)
        if model is not None:
            text += "\n" + describe_binding(adapter, bind_to_model(adapter, model, clip), model)
        return io.NodeOutput(text, ui=ui.PreviewText(text))
