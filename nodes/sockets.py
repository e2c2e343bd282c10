"""Socket types the pack adds to ComfyUI, declared once."""
from comfy_api.latest import io

from ..core.adapter import Adapter
from ..core.trainers import TrainingOptions
from ..core.training_data import TrainingImages


@io.comfytype(io_type="CSA_ADAPTER")
class AdapterSocket(io.ComfyTypeIO):
    """Per module, low-rank factors or ComfyUI's own tensors of another kind (LoHa, LoKr, OFT, diffs, ...), with a role
    (content, style, concept), method, base and strength."""

    Type = Adapter


@io.comfytype(io_type="CSA_TRAINING_DATA")
class TrainingDataSocket(io.ComfyTypeIO):
    """Training images sized for the model, one caption each (trigger word filled in), repeats per epoch."""

    Type = TrainingImages


@io.comfytype(io_type="CSA_TRAINING_OPTIONS")
class TrainingOptionsSocket(io.ComfyTypeIO):
    """Settings every trainer shares: batch, accumulation, schedule, loss weighting, periodic saves and previews."""

    Type = TrainingOptions
