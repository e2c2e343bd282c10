"""ComfyUI node classes (V3 schema). Each node validates, calls core/, and wraps the result."""
from comfy_api.latest import ComfyExtension, io

from .apply_adapters import ApplyAdapters

NODES: list[type[io.ComfyNode]] = [
    ApplyAdapters,
]


class ContentStyleAdaptersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ContentStyleAdaptersExtension:
    return ContentStyleAdaptersExtension()
