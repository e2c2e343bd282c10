"""From a LoRA file's tensors to an Adapter, and back. How files name things is core/layouts.py.

A module whose parts are plain low-rank factors (up, down, alpha; or QR-LoRA's) becomes a LowRank; a bias diff beside
them is kept as the module's tensors. Any other module is kept whole as its tensors in ComfyUI's spelling, after the
checks below: the parts ComfyUI's loader needs together are all there, one kind changes the weight, nothing is empty.
"""
from __future__ import annotations

import json

import torch

from .adapter import BIAS_PARTS, Adapter, LowRank, ModuleTensors, check_factors
from .layouts import COMFY_LORA_PARTS, KIND_OF_PART, QR_SAVED_SUFFIXES, QR_SUFFIXES, SAVED_SUFFIXES, group_by_module
from . import metadata as META

METADATA_PREFIX = META.PREFIX
UNKNOWN_KIND = "unknown kind"
LOW_RANK_PARTS = {"up", "down", "alpha"}
# a part -> the parts ComfyUI's loader reads with it (without them it fails or skips the module)
NEEDS: dict[str, tuple[str, ...]] = {
    "lora_up.weight": ("lora_down.weight",), "lora_down.weight": ("lora_up.weight",),
    "lora_mid.weight": ("lora_up.weight", "lora_down.weight"),
    "hada_w1_a": ("hada_w1_b", "hada_w2_a", "hada_w2_b"), "hada_w1_b": ("hada_w1_a",), "hada_w2_a": ("hada_w1_a",),
    "hada_w2_b": ("hada_w1_a",), "hada_t1": ("hada_t2",), "hada_t2": ("hada_t1",),
    "lokr_w1_a": ("lokr_w1_b",), "lokr_w1_b": ("lokr_w1_a",), "lokr_w2_a": ("lokr_w2_b",), "lokr_w2_b": ("lokr_w2_a",),
    "lokr_t2": ("lokr_w2_a",), "rescale": ("oft_blocks",), "b_norm": ("w_norm",),
    **{part: ("a1.weight", "a2.weight", "b1.weight", "b2.weight") for part in ("a1.weight", "a2.weight", "b1.weight",
                                                                               "b2.weight")},
}
LOKR_SIDES = (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a"))  # each side: a full matrix or its two factors
SCALED_KINDS = ("lora", "loha", "lokr", "glora", "oft", "boft")  # kinds that alpha and dora_scale act on


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str = "",
                         role: str | None = None) -> Adapter:
    """Build an Adapter from a file's tensors. Raises ValueError naming the file and module on bad factors."""
    grouped = group_by_module(tensors)
    if not grouped.parts:
        raise ValueError(f"{source}: no adapter tensors found (keys such as {sorted(tensors)[:3]}); expected "
                         f"*.lora_up/lora_down, lora_A/lora_B or lora.q/lora.delta_r weights, or any kind ComfyUI's "
                         f"LoraLoader reads (hada_*, lokr_*, oft_blocks, diff, diff_b, ...)")
    modules: dict[str, LowRank] = {}
    module_tensors: dict[str, ModuleTensors] = {}
    ignored = {key: UNKNOWN_KIND for key in grouped.unknown}
    for name, parts in grouped.parts.items():
        target = grouped.layouts[name].normalise(name)
        if target in modules or target in module_tensors:
            raise ValueError(f"{source}: modules '{name}' and another one both name '{target}'")
        try:
            factors, kept, refused = read_module(name, parts, grouped.layouts[name].method == "qr-lora")
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error
        if factors is not None:
            modules[target] = factors
        if kept is not None:
            module_tensors[target] = kept
        ignored.update(refused)
    stored = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}
    try:
        return Adapter(modules=modules, role=role or stored.get("role", "generic"),
                       method=stored.get("method") or grouped.method, base=stored.get("base", "unknown"), source=source,
                       metadata={**metadata, META.LAYOUTS: json.dumps(grouped.layout_names)},
                       module_tensors=module_tensors, ignored_keys=dict(sorted(ignored.items())))
    except ValueError as error:  # e.g. a csa.role in the file's metadata that is not a role
        raise ValueError(f"{source}: {error}") from error


def read_module(name: str, parts: dict[str, torch.Tensor], qr: bool):
    """(LowRank or None, ModuleTensors or None, {file key: reason} of parts not used) for one module."""
    bias = {p: t for p, t in parts.items() if p in BIAS_PARTS}
    rest = {p: t for p, t in parts.items() if p not in BIAS_PARTS}
    if qr:
        return qr_factors(name, rest), module_tensors_of(name, bias)[0], {}
    if rest.keys() <= LOW_RANK_PARTS and rest.keys() & {"up", "down"}:
        return lora_factors(name, rest), module_tensors_of(name, bias)[0], {}
    return None, *module_tensors_of(name, parts)


def module_tensors_of(name: str, parts: dict[str, torch.Tensor]) -> tuple[ModuleTensors | None, dict[str, str]]:
    """The module's tensors in ComfyUI's spelling, checked as ComfyUI's loader will read them; an alpha with nothing
    to scale is refused (reported, not used)."""
    tensors = {COMFY_LORA_PARTS.get(part, part): t for part, t in parts.items()}
    check_module_tensors(name, tensors)
    kinds = [oft_kind(name, tensors["oft_blocks"]) if KIND_OF_PART[p] == "oft" else KIND_OF_PART[p]
             for p in tensors if p in KIND_OF_PART]
    kinds = list(dict.fromkeys(kinds))
    weight_kinds = [k for k in kinds if k not in ("tucker", "dora", "bias diff")]
    if len(weight_kinds) > 1:
        raise ValueError(f"module '{name}' mixes {' and '.join(weight_kinds)}, which all change its weight; ComfyUI's "
                         f"loader would apply only one of them")
    if "dora" in kinds and not set(kinds) & set(SCALED_KINDS):
        raise ValueError(f"module '{name}': dora_scale without factors it could rescale (found {sorted(tensors)})")
    refused = {}
    if "alpha" in tensors and not set(kinds) & set(SCALED_KINDS):
        refused[f"{name}.alpha"] = "refused: an alpha with no factors to scale"
        del tensors["alpha"]
    return (ModuleTensors(tuple(kinds), tensors) if tensors else None), refused


def oft_kind(name: str, blocks: torch.Tensor) -> str:
    """ComfyUI reads 3-D oft_blocks as OFT and 4-D ones as BOFT."""
    if blocks.ndim not in (3, 4):
        raise ValueError(f"module '{name}': oft_blocks must be 3-D (OFT) or 4-D (BOFT), got {tuple(blocks.shape)}")
    return "oft" if blocks.ndim == 3 else "boft"


def check_module_tensors(name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the module when ComfyUI's loader would fail on it or skip part of it, or when a part
    is empty (rank 0)."""
    found = sorted(tensors)
    for part, needed in NEEDS.items():
        missing = [p for p in needed if part in tensors and p not in tensors]
        if missing:
            raise ValueError(f"module '{name}': {part} needs {', '.join(missing)} beside it (found {found})")
    if any(p.startswith("lokr_") for p in tensors):
        for side in LOKR_SIDES:
            if not any(p in tensors for p in side):
                raise ValueError(f"module '{name}': LoKr needs {' or '.join(side)} (found {found})")
    empty = sorted(p for p, t in tensors.items() if t.numel() == 0)
    if empty:
        raise ValueError(f"module '{name}': {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty (rank 0): an "
                         f"empty adapter changes nothing, so the file is probably broken")


def lora_factors(name: str, parts: dict[str, torch.Tensor]) -> LowRank:
    missing = [p for p in ("up", "down") if p not in parts]
    if missing:
        raise ValueError(f"module '{name}' has no {' or '.join(missing)} factor (found {sorted(parts)})")
    up, down = parts["up"], parts["down"]
    check_factors(name, up, down)
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    return LowRank(up=up, down=down, alpha=alpha)


def qr_factors(name: str, parts: dict[str, torch.Tensor]) -> LowRank:
    """QR-LoRA: ΔW = Q ΔR, i.e. a LoRA with up = Q and down = ΔR (scale 1). base_r rides along."""
    missing = [p for p in ("q", "delta_r") if p not in parts]
    if missing:
        raise ValueError(f"QR-LoRA module '{name}' lacks {', '.join('lora.' + p for p in missing)}")
    other = sorted(set(parts) - set(QR_SUFFIXES.values()))
    if other:
        raise ValueError(f"QR-LoRA module '{name}' also has {other}; one module holds one kind of factors")
    q, delta_r = parts["q"], parts["delta_r"]
    check_factors(name, q, delta_r)
    extras = {"base_r": parts["base_r"]} if "base_r" in parts else {}
    return LowRank(up=q, down=delta_r, alpha=None, extras=extras)


def adapter_metadata(adapter: Adapter, creation: dict | None = None) -> dict[str, str]:
    """The csa.* metadata written with a saved adapter."""
    meta = {"role": adapter.role, "method": adapter.method, "base": adapter.base,
            "ranks": json.dumps(adapter.ranks), "modules": str(len(adapter.module_names)),
            "kinds": json.dumps(adapter.kinds)}
    if creation:
        meta["created_with"] = json.dumps(creation, sort_keys=True)
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def tensors_from_modules(modules: dict[str, LowRank], names: dict[str, str], qr_form: bool = False,
                         suffixes: dict[str, str] = SAVED_SUFFIXES) -> dict[str, torch.Tensor]:
    """File tensors for the given modules, each written under ``names[module]``.

    Plain LoRAs use lora_up/lora_down/alpha (or the given ``suffixes``, e.g. B4M's lora.up / lora.down); QR-LoRA
    adapters use the official lora.q/lora.delta_r/lora.base_r.
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
        tensors[key + suffixes["up"]] = factors.up
        tensors[key + suffixes["down"]] = factors.down
        if factors.alpha is not None:
            tensors[key + suffixes["alpha"]] = torch.tensor(float(factors.alpha))
    return tensors


def tensors_from_module_tensors(module_tensors: dict[str, ModuleTensors], names: dict[str, str]) -> dict[str, torch.Tensor]:
    """File tensors for modules kept as ComfyUI's tensors: '<name>.<part>', exactly as ComfyUI's loader reads them."""
    return {f"{names[module]}.{part}": tensor for module, kept in module_tensors.items()
            for part, tensor in kept.tensors.items()}
