"""Apply Localized Residual, Show Attention Mask and New Residual Adapter (Personalized Residuals + LAG)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter
from ..core.localized import (THRESHOLD_MODES, binarize, concept_attention, final_mask, find_token_positions,
                              mask_grid, masked_residual, new_residual, residual_rank, share_conditional_mask)
from ..core.resolve import generic_module_name
from . import comfy_compat as cc
from .binding import bind_to_model
from .common import CATEGORY, node_id
from .sockets import AdapterSocket

STATE_KEY = "csa.localized_residual"
BLOCK_NAMES = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def transformer_of(model_key: str) -> tuple[str, tuple[str, int]]:
    """'diffusion_model.input_blocks.1.1.proj_out.weight' -> ('diffusion_model.input_blocks.1.1', ('input', 1))."""
    match = re.fullmatch(r"(diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d*)\.\d+)\.proj_out\.weight",
                         model_key)
    if match is None:
        raise ValueError(f"a localized residual patches transformer proj_out weights only; got {model_key}")
    return match.group(1), (BLOCK_NAMES[match.group(2)], int(match.group(3) or 0))


@dataclass
class BlockCall:
    """What one transformer block's attn2 patches saw during the current UNet call."""

    sigma: float
    cond_or_uncond: list[int]
    height: int
    width: int
    attention_sum: torch.Tensor | None = None
    count: int = 0

    def add(self, attention: torch.Tensor) -> None:
        self.attention_sum = attention if self.attention_sum is None else self.attention_sum + attention
        self.count += 1


class LocalizedResidualState:
    """Runtime state shared by one patched model's attn2 patches and proj_out forwards.

    attn2 patches note the step and (with LAG) add the concept attention of each transformer block; the
    block's proj_out then takes the mean, turns it into a mask and records it for Show Attention Mask.
    Deep copies return self: ComfyUI deep-copies model_options when it clones a model, and the patches
    must keep talking to this one object.
    """

    def __init__(self, positions: list[int], mode: str, value: float, sigma_range: tuple[float, float], lag: bool,
                 strength: float):
        self.positions, self.mode, self.value, self.lag, self.strength = positions, mode, value, lag, strength
        self.sigma_end, self.sigma_start = sigma_range
        self.reset()

    def reset(self) -> None:
        self.pending: dict[tuple, BlockCall] = {}
        self.recorded: dict[float, dict[tuple, torch.Tensor]] = {}  # sigma -> block -> (B, h, w) cond masks

    def __deepcopy__(self, memo):
        return self

    def observe(self, block: tuple, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> None:
        if block not in self.pending:
            _, _, height, width = extra_options[cc.EXTRA_ACTIVATIONS_SHAPE]
            self.pending[block] = BlockCall(float(extra_options[cc.EXTRA_SIGMAS].max()),
                                            list(extra_options.get(cc.EXTRA_COND_OR_UNCOND) or []), height, width)
        call = self.pending[block]
        if self.lag:
            attention = concept_attention(q, k, extra_options[cc.EXTRA_HEADS], self.positions)
            call.add(share_conditional_mask(attention, call.cond_or_uncond))

    def finish(self, block: tuple) -> tuple[bool, torch.Tensor | None]:
        """(apply the residual?, mask or None for everywhere) for this block's proj_out in this UNet call."""
        call = self.pending.pop(block, None)
        if call is None or not self.sigma_end <= call.sigma <= self.sigma_start:
            return False, None
        if not self.lag:
            return True, None
        mask = binarize(call.attention_sum / call.count, self.mode, self.value)
        chunks = call.cond_or_uncond or [0]
        cond = mask.chunk(len(chunks))[chunks.index(0) if 0 in chunks else 0]
        self.recorded.setdefault(call.sigma, {})[block] = cond.reshape(-1, call.height, call.width).bool().cpu()
        return True, mask


def attn2_capture(state: LocalizedResidualState, block: tuple, prior):
    """An attn2 replacement that notes concept attention, then runs the prior replacement or plain attention."""
    def patch(q, k, v, extra_options):
        state.observe(block, q, k, extra_options)
        if prior is not None:
            return prior(q, k, v, extra_options)
        return cc.default_attention(q, k, v, extra_options[cc.EXTRA_HEADS])
    return patch


def proj_out_with_residual(state: LocalizedResidualState, block: tuple, factors, forward, channels_last: bool):
    """proj_out's forward plus M ⊙ ΔW x (everywhere with LAG off; nothing outside start/end)."""
    def patched_forward(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        apply, mask = state.finish(block)
        if not apply:
            return out
        return masked_residual(out, x, factors, mask, state.strength, channels_last)
    return patched_forward


def concept_positions(clip, prompt: str, words: str) -> list[int]:
    """Token positions of every concept word (identifier and class word) in the prompt's conditioning."""
    prompt_ids, special = cc.token_ids(clip, prompt), cc.special_token_ids(clip)
    positions: set[int] = set()
    for word in words.replace(",", " ").split():
        word_ids = [t for t in cc.token_ids(clip, word) if t not in special]
        found = find_token_positions(prompt_ids, word_ids)
        if not found:
            raise ValueError(f"concept word {word!r} is not in the prompt {prompt!r}")
        positions.update(found)
    if not positions:
        raise ValueError("concept_words is empty: give the identifier and the class word, e.g. 'sks dog'")
    return sorted(positions)


def residual_targets(residual: Adapter, model) -> dict[str, object]:
    """{proj_out weight key: factors}; every module must be a transformer's proj_out."""
    targets = {key: factors for key, (_, factors) in bind_to_model(residual, model).targets.items()}
    for key in targets:
        transformer_of(key)
    return targets


def install_residuals(patched, state: LocalizedResidualState, targets: dict) -> None:
    """attn2 capture on every transformer of each residual block (chained to prior patches), proj_out forwards."""
    shapes = cc.weight_shapes(patched)
    for key, factors in targets.items():
        path, block = transformer_of(key)
        depth = sum(1 for k in shapes if k.startswith(f"{path}.transformer_blocks.") and k.endswith(".attn2.to_q.weight"))
        for index in range(depth):
            transformer = (*block, index)
            prior = cc.attn2_replace_patch(patched, transformer)
            cc.set_attn2_replace_patch(patched, attn2_capture(state, block, prior), transformer)
        module = f"{path}.proj_out"
        channels_last = len(shapes[key]) == 2
        cc.replace_module_forward(patched, module, proj_out_with_residual(
            state, block, factors, cc.module_forward(patched, module), channels_last))

    def reset_each_run(executor, *args, **kwargs):
        state.reset()
        return executor(*args, **kwargs)
    cc.add_outer_sample_wrapper(patched, STATE_KEY, reset_each_run)
    patched.model_options.setdefault("transformer_options", {})[STATE_KEY] = state


class ApplyLocalizedResidual(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("ApplyLocalizedResidual"),
            display_name="Apply Localized Residual",
            category=CATEGORY,
            description="Personalized Residuals with localized attention-guided sampling (LAG): each transformer "
                        "block's proj_out residual acts only where the concept words' cross-attention is, "
                        "W x + M ⊙ ΔW x. Chains to other packs' attention patches; no extra UNet passes.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; a patched clone is returned."),
                AdapterSocket.Input("residual", tooltip="A residual adapter: proj_out modules only (role concept)."),
                io.Clip.Input("clip", tooltip="The text encoder: finds the concept words' tokens and encodes the prompt."),
                io.String.Input("prompt", multiline=True, default="a photo of sks dog on the beach",
                                tooltip="The positive prompt; its conditioning is an output of this node."),
                io.String.Input("concept_words", default="sks dog",
                                tooltip="The identifier and the class word, as they appear in the prompt."),
                io.Boolean.Input("lag", default=True,
                                 tooltip="On: apply the residual only inside the attention mask. Off: everywhere."),
                io.Combo.Input("threshold_mode", options=list(THRESHOLD_MODES), default="median",
                               tooltip="median of the map; fixed value on the map scaled to [0, 1]; or top-k percent."),
                io.Float.Input("threshold", default=0.5, min=-1.0, max=100.0, step=0.01,
                               tooltip="The value for 'fixed value' (0..1) or the percent for 'top-k percent'."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which the residual starts acting."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress after which it stops."),
                io.Float.Input("strength", default=1.0, min=-5.0, max=5.0, step=0.01,
                               tooltip="Multiplier of the residual; 0 returns the model untouched."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with localized residuals."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt, encoded with this CLIP."),
            ],
        )

    @classmethod
    def execute(cls, model, residual: Adapter, clip, prompt: str, concept_words: str, lag: bool, threshold_mode: str,
                threshold: float, start_percent: float, end_percent: float, strength: float) -> io.NodeOutput:
        positions = concept_positions(clip, prompt, concept_words)
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        if strength == 0 or residual.strength == 0:
            return io.NodeOutput(model, conditioning)
        targets = residual_targets(residual, model)
        sigma_range = (cc.percent_to_sigma(model, end_percent), cc.percent_to_sigma(model, start_percent))
        state = LocalizedResidualState(positions, threshold_mode, threshold, sigma_range, lag,
                                       strength * residual.strength)
        patched = model.clone()
        install_residuals(patched, state, targets)
        return io.NodeOutput(patched, conditioning)


class ShowAttentionMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("ShowAttentionMask"),
            display_name="Show Attention Mask",
            category=CATEGORY,
            description="The masks Apply Localized Residual used during the last sampling run of its model.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Apply Localized Residual (the one you sampled)."),
                io.Latent.Input("samples", tooltip="The sampler's output; connecting it makes this node run after sampling."),
                io.Int.Input("steps_shown", default=8, min=1, max=64, tooltip="How many steps (columns) to show."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="Rows: blocks; columns: steps; white = residual acts."),
                io.Mask.Output(display_name="final_mask", tooltip="Last step, all blocks averaged, at image size."),
            ],
        )

    @classmethod
    def execute(cls, model, samples, steps_shown: int) -> io.NodeOutput:
        state = model.model_options.get("transformer_options", {}).get(STATE_KEY)
        if state is None:
            raise ValueError("this model has no localized residual; connect the MODEL output of Apply Localized Residual")
        if not state.recorded:
            raise ValueError("no attention masks were recorded: sample with this model with LAG on first")
        grid = mask_grid(state.recorded, steps_shown, cell=64)
        height, width = samples["samples"].shape[-2:]
        mask = final_mask(state.recorded, height * 8, width * 8)
        return io.NodeOutput(grid[None, :, :, None].expand(-1, -1, -1, 3).contiguous(), mask)


class NewResidualAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=node_id("NewResidualAdapter"),
            display_name="New Residual Adapter",
            category=CATEGORY,
            description="A Personalized Residuals adapter for this model: one low-rank residual on every transformer's "
                        "proj_out, rank = fraction x channels (5%: 16/32/64 for 320/640/1280). Train it, or use a "
                        "random one to try the nodes.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose transformer blocks get a residual."),
                io.Float.Input("rank_fraction", default=0.05, min=0.001, max=1.0, step=0.001,
                               tooltip="Rank as a fraction of each block's channels."),
                io.Float.Input("init_scale", default=0.0, min=0.0, max=10.0, step=0.001,
                               tooltip="0: up factors are zero (ready to train, no effect yet); else their std."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random factors."),
            ],
            outputs=[AdapterSocket.Output(display_name="residual", tooltip="The residual adapter (role concept).")],
        )

    @classmethod
    def execute(cls, model, rank_fraction: float, init_scale: float, seed: int) -> io.NodeOutput:
        shapes = {k: s for k, s in cc.weight_shapes(model).items()
                  if k.startswith("diffusion_model.") and k.endswith(".proj_out.weight")}
        generator = torch.Generator().manual_seed(seed)
        modules = {generic_module_name(k): new_residual(s, residual_rank(s[0], rank_fraction), generator, init_scale)
                   for k, s in sorted(shapes.items())}
        return io.NodeOutput(Adapter(modules=modules, role="concept", method="personalized-residuals",
                                     base=cc.model_name(model), source="New Residual Adapter"))
