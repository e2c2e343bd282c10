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


@io.comfytype(io_type="LORA_MODEL")
class _DeclaredLoraModel(io.ComfyTypeIO):
    Type = dict


# ComfyUI's own socket for trained LoRAs (Train LoRA -> Save LoRA Weights / Load LoRA Model): {'<module>.<part>':
# tensor}, parts as ComfyUI's loader spells them. comfy_api.latest declares it as io.LoraModel in the hosts tested; a
# host without it gets the same io_type declared here, so graphs still connect to Train LoRA's output.
LoraModelSocket = getattr(io, "LoraModel", None) or _DeclaredLoraModel
