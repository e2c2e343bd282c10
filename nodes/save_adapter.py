"""Save Adapter: write an ADAPTER to the loras folder in ComfyUI-generic or kohya key form."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..core.adapter import Adapter
from ..core.adapter_file import path_inside, write_safetensors
from ..core.formats import adapter_metadata, tensors_from_module_tensors, tensors_from_modules
from ..core.layouts import SAVE_FORMS, save_names_for, save_names_without_model
from . import comfy_compat
from .model_binding import bind_to_model, whole_targets
from .common import PackNode, schema
from .sockets import AdapterSocket, LoraModelSocket


def file_tensors(adapter: Adapter, key_form: str, model=None, clip=None) -> dict:
    """Tensors named in the chosen form; names come from the model's key map, or from the adapter itself. Low-rank
    factors as lora_up / lora_down / alpha, every other kind as ComfyUI's own keys (diff, diff_b, hada_*, ...)."""
    if model is None:
        names = save_names_without_model(adapter.module_names, key_form)
        return {**tensors_from_modules(adapter.modules, names),
                **tensors_from_module_tensors(adapter.module_tensors, names)}
    binding = bind_to_model(adapter, model, clip)
    if binding.unmatched:
        raise ValueError(f"{len(binding.unmatched)} modules do not map onto this model and would be lost: "
                         f"{binding.unmatched[:5]}")
    targets = whole_targets(binding, model)  # a fused weight's slices saved as one LoRA of the whole weight
    names = save_names_for({*targets, *binding.tensor_targets}, comfy_compat.lora_key_map(model, clip), key_form)
    modules = {names[key]: factors for key, (_, factors) in targets.items()}
    kept = {names[key]: tensors for key, (_, tensors) in binding.tensor_targets.items()}
    return {**tensors_from_modules(modules, {n: n for n in modules}),
            **tensors_from_module_tensors(kept, {n: n for n in kept})}


class SaveAdapter(PackNode):
    """Write an adapter as safetensors into the loras folder, with its role, method, base and ranks in the metadata.
    Atomic; never overwrites unless asked. Loads in ComfyUI's LoraLoader."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "SaveAdapter", "Save Adapter", output_node=True, inputs=[
                AdapterSocket.Input("adapter", tooltip="The adapter to save."),
                io.String.Input("filename", default="content_style_adapter",
                                tooltip="File name inside the loras folder ('.safetensors' is added)."),
                io.String.Input("subfolder", default="",
                                tooltip="Optional subfolder of the loras folder; must stay inside it."),
                io.Combo.Input("key_form", options=list(SAVE_FORMS), default="comfy",
                               tooltip="comfy: diffusion_model.<module> (ComfyUI generic); kohya: lora_unet_<module>."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name."),
                io.Model.Input("model", optional=True,
                               tooltip="The model the adapter belongs to; needed to rename modules between forms."),
                io.Clip.Input("clip", optional=True, tooltip="Its text encoder, when the adapter has text-encoder modules."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
        )

    @classmethod
    def execute(cls, adapter: Adapter, filename: str, subfolder: str, key_form: str, overwrite: bool,
                model=None, clip=None) -> io.NodeOutput:
        target = path_inside(comfy_compat.lora_save_root(), subfolder, filename)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; choose another filename or allow overwriting")
        tensors = file_tensors(adapter, key_form, model, clip)
        metadata = adapter_metadata(adapter, {"source": adapter.source, "key_form": key_form})
        path = write_safetensors(target, tensors, metadata, overwrite=overwrite)
        text = f"saved {len(adapter.module_names)} modules to {path}"
        if adapter.ignored_keys:
            text += f"\n{len(adapter.ignored_keys)} keys of the source file were not used and are not saved: " + \
                ", ".join(adapter.ignored_keys)
        return io.NodeOutput(str(path), ui=ui.PreviewText(text))


class AdapterToLoraModel(PackNode):
    """Hand an adapter to ComfyUI's own LoRA nodes as a LORA_MODEL (Save LoRA Weights, Load LoRA Model, and newer
    ComfyUI's loaders that take one): the tensors Save Adapter would write in ComfyUI generic form
    (diffusion_model.<module>.lora_up / lora_down / alpha; other kinds as ComfyUI's own keys). The strength is not
    baked in: set it on the loader."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "AdapterToLoraModel", "Adapter to LoRA Model", inputs=[
                AdapterSocket.Input("adapter", tooltip="The adapter to hand over (a loaded, merged or trained one)."),
                io.Model.Input("model", optional=True,
                               tooltip="The model the adapter belongs to; needed when its module names are not in "
                                       "ComfyUI generic form already (kohya, diffusers files)."),
                io.Clip.Input("clip", optional=True, tooltip="Its text encoder, when the adapter has text-encoder modules."),
            ],
            outputs=[LoraModelSocket.Output(display_name="lora", tooltip="ComfyUI's LORA_MODEL: "
                                                                         "{'<module>.<part>': tensor}.")],
        )

    @classmethod
    def execute(cls, adapter: Adapter, model=None, clip=None) -> io.NodeOutput:
        return io.NodeOutput(file_tensors(adapter, "comfy", model, clip))
