"""Adapter file layouts, one registry entry each: key suffixes, module-name normaliser, writer, method.

A file key is '<module><suffix>'. The suffix says which factor the tensor is; the module name's spelling
says the layout; the layout's normaliser turns the name into one ComfyUI's key map understands:

    layout        module name in the file                                    normalised                     method
    qr-lora       <any spelling below> + lora.q / lora.delta_r / lora.base_r  as its spelling's layout       qr-lora
    b4m           unet.unet.up_blocks.0.attentions.1...attn1.to_q            lora_unet_up_blocks_0_..._to_q b4m
    kohya         lora_unet_input_blocks_1_1_proj_in, lora_te1_...           unchanged                      lora
    comfy         diffusion_model.input_blocks.1.1.proj_in, text_encoders... unchanged                      lora
    comfy-bare    input_blocks.1.1.proj_in (no diffusion_model. prefix)      diffusion_model.input_blocks...lora
    diffusers     unet.down_blocks.0..., base_model.model.mid_block...,      lora_unet_down_blocks_0_...    lora
                  up_blocks.0...attn1.processor.to_q (old processors),
                  text_encoder.text_model.encoder.layers.0.self_attn.q_proj  unchanged
    other         anything else with a factor suffix                         unchanged (binding reports it)

Factor suffixes: plain low-rank (LORA_SUFFIXES, QR_SUFFIXES), and every other kind ComfyUI's own loader reads
(KIND_PARTS: LoHa, LoKr, OFT / BOFT, GLoRA, full-weight, bias and norm diffs, set weights; Tucker's lora_mid and
DoRA's dora_scale ride with the low-rank suffixes). A key with none of these suffixes is of an unknown kind.

ComfyUI's key map knows diffusers attention names only in the old '.processor.' spelling, which is why
diffusers / PEFT module names are rewritten into kohya's spelling of the same diffusers path.

Writers (the save forms): 'comfy' names a model weight diffusion_model.<module> / text_encoders.<module>;
'kohya' names it lora_unet_<diffusers path> (the native path where the model has no diffusers name) and
lora_te_ for one text encoder, lora_te1_ / lora_te2_ for two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .binding import normal_target
from .blocks import COMFY_UNET_ROOTS, DIFFUSERS_UNET_ROOTS

LORA_SUFFIXES: dict[str, str] = {
    ".lora_up.weight": "up",
    ".lora_down.weight": "down",
    ".lora_mid.weight": "mid",
    ".lora_B.default.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.weight": "down",
    ".lora.up.weight": "up",
    ".lora.down.weight": "down",
    "_lora.up.weight": "up",
    "_lora.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".alpha": "alpha",
    ".dora_scale": "dora_scale",
}
# Kinds ComfyUI's loader reads beside plain low-rank factors (comfy/lora.py load_lora, comfy/weight_adapter/): kind ->
# its parts, each spelled as ComfyUI's key suffix after '<module>.'. The first three are LoRA parts in ComfyUI's
# spelling (the low-rank suffixes above read them in any spelling).
KIND_PARTS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "tucker": ("lora_mid.weight",),
    "dora": ("dora_scale",),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "oft": ("oft_blocks", "rescale"),  # OFT with 3-D oft_blocks, BOFT with 4-D ones
    "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight"),
    "weight diff": ("diff",),
    "bias diff": ("diff_b",),
    "norm diff": ("w_norm", "b_norm"),
    "set weight": ("set_weight",),
}
KIND_OF_PART = {part: kind for kind, parts in KIND_PARTS.items() for part in parts}
LOW_RANK_KINDS = ("lora", "tucker", "dora")
KIND_SUFFIXES: dict[str, str] = {"." + part: part for kind, parts in KIND_PARTS.items() if kind not in LOW_RANK_KINDS
                                 for part in parts}
COMFY_LORA_PARTS = {"up": "lora_up.weight", "down": "lora_down.weight", "mid": "lora_mid.weight"}  # LORA_SUFFIXES part -> ComfyUI's
FACTOR_SUFFIXES = {**LORA_SUFFIXES, **KIND_SUFFIXES}
QR_SUFFIXES: dict[str, str] = {".lora.q.weight": "q", ".lora.delta_r.weight": "delta_r", ".lora.base_r.weight": "base_r"}
SAVED_SUFFIXES = {"up": ".lora_up.weight", "down": ".lora_down.weight", "alpha": ".alpha"}
B4M_SAVED_SUFFIXES = {"up": ".lora.up.weight", "down": ".lora.down.weight", "alpha": ".alpha"}  # the official files'
FORM_SUFFIXES = {"comfy": SAVED_SUFFIXES, "kohya": SAVED_SUFFIXES, "b4m": B4M_SAVED_SUFFIXES}
QR_SAVED_SUFFIXES = {part: suffix for suffix, part in QR_SUFFIXES.items()}
WRAPPER_PREFIXES = ("unet.", "base_model.model.")
DIFFUSERS_NAME_PREFIXES = ("unet.", "base_model.model.", "text_encoder.", "text_encoder_2.", *DIFFUSERS_UNET_ROOTS)


def _strip_wrappers(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name[len(next(p for p in WRAPPER_PREFIXES if name.startswith(p))):]
    return name


def diffusers_to_kohya(name: str) -> str:
    """A diffusers / PEFT UNet module path in kohya's spelling (what ComfyUI's key map knows); others unchanged."""
    stripped = _strip_wrappers(name)
    if not stripped.startswith(DIFFUSERS_UNET_ROOTS):
        return name
    if stripped.endswith(".processor.to_out"):  # attention processors drop to_out's ".0"
        stripped += ".0"
    return "lora_unet_" + stripped.replace(".processor.", ".").replace(".", "_")


def unchanged(name: str) -> str:
    return name


# A slice of a fused weight (FLUX's qkv and linear1) has no generic name: ComfyUI's key map reaches it through the
# diffusers name (transformer.<path>) or OneTrainer's kohya-style one (lora_transformer_<path>).
SLICE_NAME_PREFIXES = {"comfy": "transformer.", "kohya": "lora_transformer_"}


def _comfy_name(model_key, options: list[str], two_encoders: bool) -> str | None:
    generic = [n for n in options if n.startswith(("diffusion_model.", "text_encoders."))]
    if not generic and not isinstance(model_key, str):
        generic = [n for n in options if n.startswith(SLICE_NAME_PREFIXES["comfy"])]
    return min(generic, key=len) if generic else None


KOHYA_DIFFUSERS_ROOTS = tuple(root.replace(".", "_") for root in DIFFUSERS_UNET_ROOTS)


def _kohya_name(model_key: str, options: list[str], two_encoders: bool) -> str | None:
    unet = [n for n in options if n.startswith("lora_unet_")]
    if unet:
        diffusers = [n for n in unet if n[len("lora_unet_"):].startswith(KOHYA_DIFFUSERS_ROOTS)]
        return sorted(diffusers or unet)[0]
    te_prefixes = ("lora_te1_", "lora_te2_") if two_encoders else ("lora_te_",)
    te = sorted(n for n in options if n.startswith(te_prefixes))
    if not te and not isinstance(model_key, str):
        te = sorted(n for n in options if n.startswith(SLICE_NAME_PREFIXES["kohya"]))
    return te[0] if te else None


def _b4m_name(model_key: str, options: list[str], two_encoders: bool) -> str | None:
    """B4M's official spelling: 'unet.unet.<diffusers path>' (attention projections as 'attn1.to_q', 'to_out.0'),
    from the key map's 'unet.<path>' names (which spell attention as 'attn1.processor.to_q', 'processor.to_out')."""
    paths = sorted(n[len("unet."):] for n in options if n.startswith("unet.")
                   and not n.startswith("unet.base_model."))
    if not paths:
        return None
    path = paths[0].replace(".processor.to_", ".to_")
    return "unet.unet." + (path + ".0" if path.endswith(".to_out") else path)


@dataclass(frozen=True)
class Layout:
    name: str
    method: str
    suffixes: dict[str, str]  # file key suffix -> factor part
    owns: Callable[[str], bool]  # does this module name (as in the file) belong to the layout?
    normalise: Callable[[str], str]  # module name -> a name the model's key map understands
    writer: Callable[[str, list[str], bool], str | None] | None = None  # (model key, key-map names, 2 encoders)

    def split(self, key: str) -> tuple[str, str] | None:
        """(module, part) when the key is one of this layout's factor tensors."""
        for suffix in sorted(self.suffixes, key=len, reverse=True):
            if key.endswith(suffix) and len(key) > len(suffix) and self.owns(key[: -len(suffix)]):
                return key[: -len(suffix)], self.suffixes[suffix]
        return None


NAMING_LAYOUTS: tuple[Layout, ...] = (
    Layout("b4m", "b4m", FACTOR_SUFFIXES, lambda m: m.startswith("unet.unet."), diffusers_to_kohya, _b4m_name),
    Layout("kohya", "lora", FACTOR_SUFFIXES, lambda m: m.startswith(("lora_unet_", "lora_te")), unchanged, _kohya_name),
    Layout("comfy", "lora", FACTOR_SUFFIXES, lambda m: m.startswith(("diffusion_model.", "text_encoders.")), unchanged,
           _comfy_name),
    Layout("comfy-bare", "lora", FACTOR_SUFFIXES, lambda m: m.startswith(COMFY_UNET_ROOTS),
           lambda m: "diffusion_model." + m),
    Layout("diffusers", "lora", FACTOR_SUFFIXES, lambda m: m.startswith(DIFFUSERS_NAME_PREFIXES), diffusers_to_kohya),
    Layout("other", "lora", FACTOR_SUFFIXES, lambda m: True, unchanged),
)


def naming_layout(module: str) -> Layout:
    """The layout whose module-name spelling this is (the last one, 'other', takes any name)."""
    return next(layout for layout in NAMING_LAYOUTS if layout.owns(module))


def normalise_module_name(module: str) -> str:
    return naming_layout(module).normalise(module)


QR_LORA = Layout("qr-lora", "qr-lora", QR_SUFFIXES, lambda m: True, normalise_module_name)
LAYOUTS: tuple[Layout, ...] = (QR_LORA, *NAMING_LAYOUTS)  # first match wins; method priority in this order
SAVE_FORMS = {layout.name: layout for name in ("comfy", "kohya") for layout in NAMING_LAYOUTS if layout.name == name}
WRITERS = {layout.name: layout for layout in NAMING_LAYOUTS if layout.writer is not None}  # SAVE_FORMS + b4m (trainers)


def split_key(key: str) -> tuple[Layout, str, str] | None:
    """(layout, module, part) for a file key, or None when its suffix is no known factor."""
    for layout in LAYOUTS:
        split = layout.split(key)
        if split is not None:
            return layout, *split
    return None


@dataclass
class FileModules:
    """A file's tensors grouped per module: {module: {part: tensor}}, each module's layout, and the keys that
    are no known factor."""

    parts: dict[str, dict[str, torch.Tensor]]
    layouts: dict[str, Layout]
    unknown: list[str]

    @property
    def method(self) -> str:
        seen = {layout.name for layout in self.layouts.values()}
        return next((layout.method for layout in LAYOUTS if layout.name in seen), "lora")

    @property
    def layout_names(self) -> list[str]:
        return sorted({layout.name for layout in self.layouts.values()})


def group_by_module(tensors: dict[str, torch.Tensor]) -> FileModules:
    grouped = FileModules({}, {}, [])
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            grouped.unknown.append(key)
            continue
        layout, module, part = split
        grouped.parts.setdefault(module, {})[part] = tensor
        grouped.layouts[module] = layout if grouped.layouts.get(module) in (None, layout) else QR_LORA
    grouped.unknown.sort()
    return grouped


# -- writing ------------------------------------------------------------------------------------------

def save_names_for(model_keys, key_map: dict, form: str) -> dict[str, str]:
    """{model weight key: module name to write in save form ``form``}, inverting the model's key map."""
    if form not in WRITERS:
        raise ValueError(f"key form must be one of {tuple(WRITERS)}, got {form!r}")
    wanted = set(model_keys)  # weight keys, or (weight key, slice) targets
    candidates: dict[object, list[str]] = {k: [] for k in wanted}
    for name, key in key_map.items():
        key = normal_target(key)
        if key in wanted:
            candidates[key].append(name)
    two_encoders = any(isinstance(k, str) and k.startswith("clip_g.") for k in key_map.values())
    names = {}
    for key, options in candidates.items():
        chosen = WRITERS[form].writer(key, options, two_encoders)
        if chosen is None:
            raise ValueError(f"the model's key map has no {form} name for {key}")
        names[key] = chosen
    return names


def save_names_without_model(modules, form: str) -> dict[str, str]:
    """Names in save form ``form`` without a model's key map: names already in that form stay, ComfyUI generic
    UNet names convert to kohya's native spelling; anything else needs the model to be renamed."""
    if form not in SAVE_FORMS:
        raise ValueError(f"key form must be one of {tuple(SAVE_FORMS)}, got {form!r}")
    modules = list(modules)
    if all(naming_layout(n).name == form for n in modules):
        return {n: n for n in modules}
    if form == "kohya" and all(n.startswith("diffusion_model.") for n in modules):
        return {n: "lora_unet_" + n[len("diffusion_model."):].replace(".", "_") for n in modules}
    raise ValueError(f"the adapter's module names are not in {form} form; connect the model it belongs to "
                     f"so they can be renamed through its key map")


def generic_module_name(model_key: str) -> str:
    """ComfyUI's generic module name for a model weight key (what its key map accepts everywhere)."""
    stem = model_key[: -len(".weight")] if model_key.endswith(".weight") else model_key
    return stem if stem.startswith("diffusion_model.") else "text_encoders." + stem
