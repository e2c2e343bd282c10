"""From a LoRA file's tensors to an Adapter, and back. How files name things is core/layouts.py."""
from __future__ import annotations

import json

import torch

from .adapter import Adapter, LowRank, check_factors
from .layouts import QR_SAVED_SUFFIXES, SAVED_SUFFIXES, group_by_module

METADATA_PREFIX = "csa."


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "",
                         role: str | None = None) -> Adapter:
    """Build an Adapter from a file's tensors. Raises ValueError naming the file and module on bad factors."""
    grouped = group_by_module(tensors)
    if not grouped.parts:
        raise ValueError(f"{source}: no LoRA factors found (keys such as {sorted(tensors)[:3]}); "
                         f"expected *.lora_up/lora_down, lora_A/lora_B or lora.q/lora.delta_r weights")
    modules: dict[str, LowRank] = {}
    for name, parts in grouped.parts.items():
        layout = grouped.layouts[name]
        try:
            factors = qr_factors(name, parts) if layout.method == "qr-lora" else lora_factors(name, parts)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error
        target = layout.normalise(name)
        if target in modules:
            raise ValueError(f"{source}: modules '{name}' and another one both name '{target}'")
        modules[target] = factors
    stored = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
    try:
        return Adapter(modules=modules, role=role or stored.get("role", "generic"),
                       method=stored.get("method") or grouped.method, base=stored.get("base", "unknown"), source=source,
                       metadata={**metadata, "csa.layouts": json.dumps(grouped.layout_names),
                                 "csa.ignored_keys": json.dumps(grouped.unknown)})
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
            tensors[key + QR_SAVED_SUFFIXES["q"]] = factors.up
            tensors[key + QR_SAVED_SUFFIXES["delta_r"]] = factors.down
            if "base_r" in factors.extras:
                tensors[key + QR_SAVED_SUFFIXES["base_r"]] = factors.extras["base_r"]
            continue
        tensors[key + SAVED_SUFFIXES["up"]] = factors.up
        tensors[key + SAVED_SUFFIXES["down"]] = factors.down
        if factors.alpha is not None:
            tensors[key + SAVED_SUFFIXES["alpha"]] = torch.tensor(float(factors.alpha))
    return tensors
