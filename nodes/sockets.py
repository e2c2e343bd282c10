"""Socket types the pack adds to ComfyUI, declared once."""
from comfy_api.latest import io

from ..core.adapter import Adapter


@io.comfytype(io_type="CSA_ADAPTER")
class AdapterSocket(io.ComfyTypeIO):
    """Per module, low-rank factors or ComfyUI's own tensors of another kind (LoHa, LoKr, OFT, diffs, ...), with a role
    (content, style, concept), method, base and strength."""

    Type = Adapter
