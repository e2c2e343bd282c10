"""Apply Adapter: patch a MODEL (and optionally a CLIP) with a LoRA file through ComfyUI's key map."""
from __future__ import annotations

from comfy_api.latest import io

from ..core.adapter_file import read_safetensors
from ..core.lora_keys import group_by_module, keys_of_modules
from . import comfy_compat
from .common import CATEGORY, node_id


def match_modules(modules: set[str], key_map: dict) -> tuple[set[str], list[str]]:
    matched = {m for m in modules if m in key_map}
    return matched, sorted(modules - matched)


def describe_match(file_name: str, architecture: str, matched: set[str], unmatched: list[str],
                   unknown_keys: list[str]) -> str:
    lines = [f"{file_name}: {len(matched)} of {len(matched) + len(unmatched)} modules mapped onto {architecture}"]
    if unmatched:
        lines.append("unmapped modules: " + ", ".join(unmatched))
    if unknown_keys:
        lines.append("keys that are no LoRA factor: " + ", ".join(unknown_keys))
    return "\n".join(lines)


class ApplyAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("ApplyAdapters"),
            display_name="Apply Adapter",
            category=CATEGORY,
            description="Apply a LoRA-style adapter file to a diffusion model (and optionally its text encoder) "
                        "through ComfyUI's own key map. The input model is never modified.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch. A patched clone is returned."),
                io.Combo.Input("adapter_name", options=comfy_compat.adapter_file_names(),
                               tooltip="Adapter file in ComfyUI's loras folder (safetensors)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the adapter's weight change; 0 returns the model untouched."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoder; patched with the adapter's text-encoder keys, if any."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="A clone of the model with the adapter patched in."),
                io.Clip.Output(display_name="clip", tooltip="The patched text encoder (None when no CLIP was given)."),
                io.String.Output(display_name="report", tooltip="Which adapter modules mapped onto the model and which did not."),
            ],
        )

    @classmethod
    def execute(cls, model, adapter_name: str, strength: float, clip=None) -> io.NodeOutput:
        tensors, _ = read_safetensors(comfy_compat.adapter_file_path(adapter_name))
        modules, unknown_keys = group_by_module(tensors)
        key_map = comfy_compat.lora_key_map(model, clip)
        matched, unmatched = match_modules(set(modules), key_map)
        architecture = comfy_compat.model_architecture(model)
        if not matched:
            raise ValueError(f"{adapter_name}: this adapter does not match this model ({architecture}): none of its "
                             f"{len(modules)} modules is in the model's key map (first: {sorted(modules)[:3]})")
        report = describe_match(adapter_name, architecture, matched, unmatched, unknown_keys)
        if strength == 0:
            return io.NodeOutput(model, clip, report)
        patches = comfy_compat.comfy_lora_patches(keys_of_modules(tensors, matched),
                                                  {m: key_map[m] for m in matched})
        model = model.clone()
        model.add_patches(patches, strength)
        if clip is not None:
            clip = clip.clone()
            clip.add_patches(patches, strength)
        return io.NodeOutput(model, clip, report)
