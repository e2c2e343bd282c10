"""Content-Style Guider (ConsisLoRA guidance) and Compose Content and Style (B-LoRA composition).

The four adapters are switched per UNet call: each target layer's forward adds the low-rank terms of
the adapters active for that call, read from transformer_options, so no weight is re-patched per step.

    ε = ε_cc,ss(c) + w [ε_cc,ss(c) − ε_cc,ss(∅)]            (ComfyUI's CFG, cfg = w + 1)
        + λ_content [ε_cc(c_c+) − ε_sc(c_c−)] + λ_style [ε_ss(c_s+) − ε_cs(c_s−)]

cc / cs: content- and style-block adapters learned from the content image; sc / ss: from the style image.
The terms are linear, so they are applied to ComfyUI's denoised predictions exactly as to ε.
"""
from __future__ import annotations

from comfy_api.latest import io

import comfy.samplers

from ..core.adapter import Adapter
from ..core.blocks import select_b_lora_part
from . import comfy_compat as cc
from .common import PackNode, cfg_conditioning_inputs, schema, strength_input
from .model_binding import apply_patch_groups, patches_by_strength
from .runtime_adapters import ACTIVE_KEY, install_switched_adapters
from .sockets import AdapterSocket

SLOTS = {"content_of_content": "cc", "style_of_content": "cs", "content_of_style": "sc", "style_of_style": "ss"}
TERMS = {"content": ("cc", "sc"), "style": ("ss", "cs")}  # (positive prompt adapter, negative prompt adapter)
DEFAULT_PROMPTS = {"content_positive": "a {c}", "content_negative": "a {v}",
                   "style_positive": "in the style of {v}", "style_negative": "in the style of {c}"}


class ContentStyleCFGGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFG guider plus the two ConsisLoRA guidance terms."""

    def configure(self, cfg: float, lambdas: dict[str, float], base: frozenset[str]):
        self.set_cfg(cfg)
        self.lambdas, self.base = lambdas, base

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        options = cc.with_transformer_option(model_options, ACTIVE_KEY, self.base)
        out = cc.cfg_prediction(self.inner_model, x, timestep, self.conds.get("negative"), self.conds.get("positive"),
                                self.cfg, options, seed)
        for term, weight in self.lambdas.items():
            if weight == 0:
                continue
            plus, minus = TERMS[term]
            pos = cc.cond_prediction(self.inner_model, self.conds[f"{term}_positive"], x, timestep,
                                     cc.with_transformer_option(model_options, ACTIVE_KEY, frozenset({plus})))
            neg = cc.cond_prediction(self.inner_model, self.conds[f"{term}_negative"], x, timestep,
                                     cc.with_transformer_option(model_options, ACTIVE_KEY, frozenset({minus})))
            out = out + weight * (pos - neg)
        return out


def guidance_prompts(clip, prompts: dict[str, str], content_token: str, style_token: str) -> dict:
    """The four guidance prompts with {c} and {v} filled in, encoded."""
    return {name: clip.encode_from_tokens_scheduled(clip.tokenize(text.replace("{c}", content_token)
                                                                  .replace("{v}", style_token)))
            for name, text in prompts.items()}


def check_terms(adapters: dict[str, Adapter], lambdas: dict[str, float]) -> None:
    for term, weight in lambdas.items():
        missing = [slot for slot, short in SLOTS.items() if short in TERMS[term] and short not in adapters]
        if weight != 0 and missing:
            raise ValueError(f"lambda_{term} = {weight} needs the adapters {missing}; connect them or set lambda_{term} to 0")
    if not {"cc", "ss"} & set(adapters):
        raise ValueError("connect at least content_of_content or style_of_style (the adapters the image is made with)")


class ContentStyleGuider(PackNode):
    """ConsisLoRA guidance for SamplerCustomAdvanced: CFG with the content image's content-block adapter and the style
    image's style-block adapter, plus λ_content and λ_style guidance terms (two extra conditional UNet passes each;
    none when λ is 0)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ContentStyleGuider", "Content-Style Guider", inputs=[
                io.Model.Input("model", tooltip="The base model (without the four adapters applied)."),
                io.Clip.Input("clip", tooltip="Encodes the guidance prompts."),
                *cfg_conditioning_inputs("The prompt, e.g. 'a [c] in the style of [v]'.",
                                         "The negative prompt of the CFG part."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="ComfyUI CFG scale (the paper's w is cfg − 1)."),
                strength_input("lambda_content", "Content guidance strength λ_content; 0 disables the term (no extra "
                               "passes).", default=0.0, step=0.05),
                strength_input("lambda_style", "Style guidance strength λ_style; 0 disables the term.", default=0.0,
                               step=0.05),
                io.String.Input("content_token", default="[c]", tooltip="The content identifier, for {c} in the prompts."),
                io.String.Input("style_token", default="[v]", tooltip="The style identifier, for {v} in the prompts."),
                *[io.String.Input(name, default=text, tooltip=f"Guidance prompt ({name.replace('_', ' ')}); "
                                  "{c} and {v} are replaced by the tokens. Default as in ConsisLoRA's README.")
                  for name, text in DEFAULT_PROMPTS.items()],
                *[AdapterSocket.Input(slot, optional=True, tooltip=f"{slot.replace('_', ' ')} ({short}): the "
                                      f"{'content' if short[0] == 'c' else 'style'} image's "
                                      f"{'content' if short[1] == 'c' else 'style'}-block adapter.")
                  for slot, short in SLOTS.items()],
            ],
            outputs=[io.Guider.Output(display_name="guider", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, clip, positive, negative, cfg: float, lambda_content: float, lambda_style: float,
                content_token: str, style_token: str, **rest) -> io.NodeOutput:
        adapters = {short: rest[slot] for slot, short in SLOTS.items() if rest.get(slot) is not None}
        lambdas = {"content": lambda_content, "style": lambda_style}
        check_terms(adapters, lambdas)
        patched = model.clone()
        base = frozenset({"cc", "ss"} & set(adapters))
        install_switched_adapters(patched, adapters, base)
        guider = ContentStyleCFGGuider(patched)
        prompts = guidance_prompts(clip, {k: rest[k] for k in DEFAULT_PROMPTS}, content_token, style_token)
        guider.inner_set_conds({"positive": positive, "negative": negative, **prompts})
        guider.configure(cfg, lambdas, base)
        return io.NodeOutput(guider)


class ComposeContentAndStyle(PackNode):
    """Plain B-LoRA composition without guidance: the content block of the content image's adapter plus the style block
    of the style image's adapter, patched into the model (any sampler)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ComposeContentAndStyle", "Compose Content and Style (B-LoRA)", inputs=[
                io.Model.Input("model", tooltip="The base model; a patched clone is returned."),
                AdapterSocket.Input("content_image_adapter", tooltip="Adapter learned from the content image."),
                AdapterSocket.Input("style_image_adapter", tooltip="Adapter learned from the style image."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with both blocks applied."),
                io.String.Output(display_name="report", tooltip="Which modules were applied."),
            ],
        )

    @classmethod
    def execute(cls, model, content_image_adapter: Adapter, style_image_adapter: Adapter) -> io.NodeOutput:
        content = select_b_lora_part(content_image_adapter, "content")
        style = select_b_lora_part(style_image_adapter, "style")
        groups, report = patches_by_strength([content, style], model, None, {})
        patched, _ = apply_patch_groups(model, None, groups)
        return io.NodeOutput(patched, report)

