"""ComfyUI node classes (V3 schema). Each node validates, calls core/, and wraps the result."""
from comfy_api.latest import ComfyExtension, io

from . import comfy_compat
from .adapter_info import AdapterInfo
from .apply_adapters import ApplyAdapters
from .consistency_guidance import ComposeContentAndStyle, ContentStyleGuider
from .ipl import ImageToPromptVectors, TrainPromptMapper, ZeroShotAdapt
from .klora import KLoRA
from .localized_residual import ApplyLocalizedResidual, NewResidualAdapter, ShowAttentionMask
from .load_adapter import AdapterFromLoraModel, LoadAdapter, LoadContentAdapter, LoadStyleAdapter
from .qr_merge import ConvertToQRLoRA, QRMerge
from .save_adapter import AdapterToLoraModel, SaveAdapter
from .scores import ScoreContentStylePrompt
from .strength_sweep import GuiderStrengthSweep, StrengthSweep
from .train_adapters import (TrainAdapter, TrainConsisLoRA, TrainingImagesNode, TrainingLatentsNode, TrainingOptionsNode,
                             TrainQRLoRA)
from .train_b4m import B4MMake, TrainB4MContent, TrainB4MStyle
from .train_residual import TrainPersonalizedResidual
from .train_ziplora import TrainZipLoRA

NODES: list[type[io.ComfyNode]] = [
    LoadAdapter,
    LoadContentAdapter,
    LoadStyleAdapter,
    ApplyAdapters,
    AdapterInfo,
    SaveAdapter,
    AdapterFromLoraModel,
    AdapterToLoraModel,
    QRMerge,
    ConvertToQRLoRA,
    KLoRA,
    NewResidualAdapter,
    ApplyLocalizedResidual,
    ShowAttentionMask,
    ContentStyleGuider,
    ComposeContentAndStyle,
    ImageToPromptVectors,
    TrainPromptMapper,
    ZeroShotAdapt,
    ScoreContentStylePrompt,
    StrengthSweep,
    GuiderStrengthSweep,
    TrainingImagesNode,
    TrainingLatentsNode,
    TrainingOptionsNode,
    TrainAdapter,
    TrainConsisLoRA,
    TrainQRLoRA,
    TrainB4MContent,
    TrainB4MStyle,
    B4MMake,
    TrainPersonalizedResidual,
    TrainZipLoRA,
]


class ContentStyleAdaptersExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ContentStyleAdaptersExtension:
    comfy_compat.register_pack_folders()
    return ContentStyleAdaptersExtension()
