"""From a LoRA file's tensors to an Adapter, and back.

Module names are normalised into a spelling ComfyUI's key map understands, so any model can resolve them:

    file module name                                         -> adapter module name
    lora_unet_input_blocks_1_1_proj_in        (kohya)        -> unchanged
    diffusion_model.input_blocks.1.1.proj_in  (ComfyUI)      -> unchanged
    unet.unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q   (B4M, doubled prefix)
    unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q        (diffusers / PEFT)
    up_blocks.0.attentions.1.transformer_blocks.0.attn1.processor.to_q   (old attention processors,
                                                              which also write to_out for to_out.0)
                                                             -> lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj            -> unchanged

ComfyUI's own key map knows diffusers attention names only in the old '.processor.' spelling, which is
why PEFT attention keys are rewritten into kohya's spelling of the same diffusers path.
"""
from __future__ import annotations

import json

import torch

from .adapter import Adapter, LowRank, check_factors
from .lora_keys import group_by_module

DIFFUSERS_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out",
                        "time_embedding.", "add_embedding.")
WRAPPER_PREFIXES = ("unet.", "base_model.model.")
METADATA_PREFIX = "csa."


def normalise_module_name(name: str) -> str:
    stripped = name
    while stripped.startswith(WRAPPER_PREFIXES):
        stripped = stripped[len(next(p for p in WRAPPER_PREFIXES if stripped.startswith(p))):]
    if stripped.startswith(DIFFUSERS_UNET_ROOTS):
        if stripped.endswith(".processor.to_out"):  # attention processors drop to_out's ".0"
            stripped += ".0"
        return "lora_unet_" + stripped.replace(".processor.", ".").replace(".", "_")
    return name


def key_form(names) -> str:
    """How a file spells its module names: 'kohya', 'comfy', 'diffusers' or 'mixed'."""
    forms = set()
    for name in names:
        if name.startswith(("lora_unet_", "lora_te")):
            forms.add("kohya")
        elif name.startswith(("diffusion_model.", "text_encoders.")):
            forms.add("comfy")
        else:
            forms.add("diffusers")
    return forms.pop() if len(forms) == 1 else "mixed"


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "",
                         role: str | None = None) -> Adapter:
    """Build an Adapter from a file's tensors. Raises ValueError naming the file and module on bad factors."""
    grouped, unknown = group_by_module(tensors)
    if not grouped:
        raise ValueError(f"{source}: no LoRA factors found (keys such as {sorted(tensors)[:3]}); "
                         f"expected *.lora_up/lora_down, lora_A/lora_B or lora.q/lora.delta_r weights")
    modules: dict[str, LowRank] = {}
    is_qr = any("delta_r" in parts for parts in grouped.values())
    for name, parts in grouped.items():
        try:
            factors = qr_factors(name, parts) if is_qr else lora_factors(name, parts)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error
        target = normalise_module_name(name)
        if target in modules:
            raise ValueError(f"{source}: modules '{name}' and another one both name '{target}'")
        modules[target] = factors
    stored = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
    method = stored.get("method") or ("qr-lora" if is_qr else "b4m" if any(n.startswith("unet.unet.") for n in grouped)
                                      else "lora")
    try:
        return Adapter(modules=modules, role=role or stored.get("role", "generic"), method=method,
                       base=stored.get("base", "unknown"), source=source,
                       metadata={**metadata, "csa.key_form": key_form(grouped), "csa.ignored_keys": json.dumps(unknown)})
    except ValueError as error:  # e.g. a csa.role in the file's metadata that is not a role
        raise ValueError(f"{source}: {error}") from error


def lora_factors(name: str, parts: dict[str, torch.Tensor]) -> LowRank:
    missing = [p for p in ("up", "down") if p not in parts]
    if missing:
        raise ValueError(f"module '{name}' has no {' or '.join(missing)} factor (found {sorted(parts)})")
    if "mid" in parts or "dora_scale" in parts:
        kind = "Tucker (lora_mid)" if "mid" in parts else "DoRA (dora_scale)"
        raise ValueError(f"module '{name}' is a {kind} adapter, which this pack does not read; use ComfyUI's LoraLoader")
    up, down = parts["up"], parts["down"]
    check_factors(name, up, down)
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    return LowRank(up=up, down=down, alpha=alpha)


def qr_factors(name: str, parts: dict[str, torch.Tensor]) -> LowRank:
    """QR-LoRA: ΔW = Q ΔR, i.e. a LoRA with up = Q and down = ΔR (scale 1). base_r rides along."""
    missing = [p for p in ("q", "delta_r") if p not in parts]
    if missing:
        raise ValueError(f"QR-LoRA module '{name}' lacks {', '.join('lora.' + p for p in missing)}")
    q, delta_r = parts["q"], parts["delta_r"]
    check_factors(name, q, delta_r)
    extras = {"base_r": parts["base_r"]} if "base_r" in parts else {}
    return LowRank(up=q, down=delta_r, alpha=None, extras=extras)


def adapter_metadata(adapter: Adapter, creation: dict | None = None) -> dict[str, str]:
    """The csa.* metadata written with a saved adapter."""
    meta = {"role": adapter.role, "method": adapter.method, "base": adapter.base,
            "ranks": json.dumps(adapter.ranks), "modules": str(len(adapter.modules))}
    if creation:
        meta["created_with"] = json.dumps(creation, sort_keys=True)
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def tensors_from_modules(modules: dict[str, LowRank], names: dict[str, str], qr_form: bool = False) -> dict[str, torch.Tensor]:
    """File tensors for the given modules, each written under ``names[module]``.

    Plain LoRAs use lora_up/lora_down/alpha; QR-LoRA adapters use the official lora.q/lora.delta_r/lora.base_r.
    """
    tensors = {}
    for module, factors in modules.items():
        key = names[module]
        if qr_form:
            tensors[f"{key}.lora.q.weight"] = factors.up
            tensors[f"{key}.lora.delta_r.weight"] = factors.down
            if "base_r" in factors.extras:
                tensors[f"{key}.lora.base_r.weight"] = factors.extras["base_r"]
            continue
        tensors[f"{key}.lora_up.weight"] = factors.up
        tensors[f"{key}.lora_down.weight"] = factors.down
        if factors.alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(factors.alpha))
    return tensors
