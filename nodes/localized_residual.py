"""Apply Localized Residual, Show Attention Mask and New Residual Adapter (Personalized Residuals + LAG)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..core.adapter import Adapter
from ..core.blocks import JOINT_ATTENTION, block_of_module, residual_site
from ..core.layouts import generic_module_name
from ..core.localized import (THRESHOLD_MODES, binarize, concept_attention, evenly_spaced, final_mask,
                              find_token_positions, image_masks, joint_concept_attention, mask_grid, new_residual,
                              residual_rank, share_conditional_mask)
from . import comfy_compat as cc
from .common import PackNode, schema, strength_input
from .model_binding import apply_patch_groups, patches_by_strength
from .plots import mask_grid_plot
from .runtime_adapters import add_to_forward, check_runtime_factors, low_rank_targets, publish_call_options
from .sockets import AdapterSocket
from ..core import metadata as META

STATE_KEY = META.LOCALIZED_RESIDUAL  # transformer option: this model's LocalizedResidualState
RESIDUAL = "residual"


@dataclass
class BlockCall:
    """What one transformer block's attn2 patches (UNet) or its joint attention (FLUX double block) saw during the
    current model call."""

    sigma: float
    cond_or_uncond: list[int]
    height: int | None  # the attention's pixel grid (UNet); None: a DiT's image tokens, kept flat until shown
    width: int | None
    attention_sum: torch.Tensor | None = None
    count: int = 0
    text_length: int = 0  # joint attention: the text tokens before the image tokens

    def add(self, attention: torch.Tensor) -> None:
        self.attention_sum = attention if self.attention_sum is None else self.attention_sum + attention
        self.count += 1


@dataclass(frozen=True)
class LocalizedResidualSettings:
    positions: tuple[int, ...]
    mode: str
    value: float
    sigma_range: tuple[float, float]  # (end, start): the residual acts for end <= sigma <= start
    lag: bool


class LocalizedResidualState:
    """One patched model's state: its settings, the current UNet call's attention, the last run's masks.

    It lives in the model's transformer_options. Every sampling run puts a new one into the options of the patcher
    it samples, so a model sampled downstream never writes into the masks of the model it was cloned from, however
    ComfyUI copies model_options into clones; a clone that has not run yet gets its own, empty, on 0.3.75.
    """

    def __init__(self, settings: LocalizedResidualSettings):
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        self.pending: dict[tuple, BlockCall] = {}
        self.recorded: dict[float, dict[tuple, torch.Tensor]] = {}  # sigma -> block -> (B, h, w) cond masks

    def __deepcopy__(self, memo):
        return LocalizedResidualState(self.settings)

    def observe(self, block: tuple, q: torch.Tensor, k: torch.Tensor, extra_options: dict) -> None:
        if block not in self.pending:
            _, _, height, width = extra_options[cc.EXTRA_ACTIVATIONS_SHAPE]
            self.pending[block] = BlockCall(float(extra_options[cc.EXTRA_SIGMAS].max()),
                                            list(extra_options.get(cc.EXTRA_COND_OR_UNCOND) or []), height, width)
        call = self.pending[block]
        if self.settings.lag:
            attention = concept_attention(q, k, extra_options[cc.EXTRA_HEADS], list(self.settings.positions))
            call.add(share_conditional_mask(attention, call.cond_or_uncond))

    def begin_joint(self, block: tuple, transformer_options: dict, text_length: int) -> None:
        """A FLUX double block starts: note the call's sigma, CFG chunks and the text tokens' count."""
        self.pending[block] = BlockCall(float(transformer_options[cc.EXTRA_SIGMAS].max()),
                                        list(transformer_options.get(cc.EXTRA_COND_OR_UNCOND) or []), None, None,
                                        text_length=text_length)

    def observe_joint(self, block: tuple, q: torch.Tensor, k: torch.Tensor) -> None:
        """The double block's joint attention: the image queries' mass on the concept's text tokens."""
        call = self.pending.get(block)
        if call is not None and self.settings.lag:
            attention = joint_concept_attention(q, k, call.text_length, list(self.settings.positions))
            call.add(share_conditional_mask(attention, call.cond_or_uncond))

    def finish(self, block: tuple) -> tuple[bool, torch.Tensor | None]:
        """(apply the residual?, mask or None for everywhere) for this block's proj_out in this UNet call."""
        call = self.pending.pop(block, None)
        sigma_end, sigma_start = self.settings.sigma_range
        if call is None or not sigma_end <= call.sigma <= sigma_start:
            return False, None
        if not self.settings.lag:
            return True, None
        mask = binarize(call.attention_sum / call.count, self.settings.mode, self.settings.value)
        chunks = call.cond_or_uncond or [0]
        cond = mask.chunk(len(chunks))[chunks.index(0) if 0 in chunks else 0]
        kept = cond if call.height is None else cond.reshape(-1, call.height, call.width)
        self.recorded.setdefault(call.sigma, {})[block] = kept.bool().cpu()
        return True, mask


def attn2_capture(block: tuple, prior):
    """An attn2 replacement that notes concept attention in the sampled model's state, then runs the prior
    replacement or plain attention."""
    def patch(q, k, v, extra_options):
        state = extra_options.get(STATE_KEY)
        if state is not None:
            state.observe(block, q, k, extra_options)
        if prior is not None:
            return prior(q, k, v, extra_options)
        return cc.default_attention(q, k, v, extra_options[cc.EXTRA_HEADS])
    return patch


def double_block_capture(block: tuple, prior):
    """A FLUX double-block replacement that notes the call's text length in the sampled model's state, then runs the
    prior replacement (another pack's) or the block itself."""
    def patch(args: dict, extra: dict):
        options = args.get("transformer_options") or {}
        state = options.get(STATE_KEY)
        if state is not None:
            state.begin_joint(block, options, args["txt"].shape[1])
        return prior(args, extra) if prior is not None else extra["original_block"](args)
    return patch


def joint_attention_capture(blocks: frozenset, prior):
    """An attention override that notes the concept attention of the residual blocks' joint attention (the block
    FLUX is running is in the call's transformer_options), then runs the prior override or the attention itself."""
    def override(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        state = options.get(STATE_KEY)
        block = (options.get(cc.BLOCK_TYPE), options.get(cc.BLOCK_INDEX))
        if state is not None and block in blocks:
            state.observe_joint(block, args[0], args[1])
        return prior(func, *args, **kwargs) if prior is not None else func(*args, **kwargs)
    return override


def residual_where_attended(block: tuple):
    """select() for the proj_out residual: off outside start/end, masked by the block's attention with LAG."""
    def select(options: dict):
        state = options.get(STATE_KEY)
        if state is None:
            return (), None
        apply, mask = state.finish(block)
        return ((RESIDUAL,) if apply else ()), mask
    return select


def concept_positions(clip, prompt: str, words: str, stream: str | None = None) -> list[int]:
    """Token positions of every concept word (identifier and class word) in the prompt's conditioning: in its CLIP-L
    tokens (UNets), or in ``stream`` ('t5xxl': FLUX's context is its T5 tokens)."""
    prompt_ids, special = cc.token_ids(clip, prompt, stream), cc.special_token_ids(clip, stream)
    positions: set[int] = set()
    for word in words.replace(",", " ").split():
        word_ids = [t for t in cc.token_ids(clip, word, stream) if t not in special]
        found = find_token_positions(prompt_ids, word_ids)
        if not found:
            raise ValueError(f"concept word {word!r} is not in the prompt {prompt!r}")
        positions.update(found)
    if not positions:
        raise ValueError("concept_words is empty: give the identifier and the class word, e.g. 'sks dog'")
    return sorted(positions)


def outside_text_encoder(residual: Adapter) -> Adapter:
    """The residual without its text-encoder modules (the identifier's token-embedding row, if trained)."""
    return residual.subset([m for m in residual.module_names if block_of_module(m) != "text_encoder"])


def with_text_encoder_part(residual: Adapter, model, clip, strength: float) -> tuple[Adapter, object]:
    """(the residual without its text-encoder modules, a CLIP clone with them patched in at ``strength``): a residual
    trained with its identifier's token embedding carries that row change for the text encoder."""
    text = [m for m in residual.module_names if block_of_module(m) == "text_encoder"]
    if not text:
        return residual, clip
    groups, _ = patches_by_strength([residual.subset(text).replace(strength=residual.strength * strength)], model,
                                    clip, {})
    _, patched = apply_patch_groups(model, clip, groups)
    return outside_text_encoder(residual), patched


def residual_targets(residual: Adapter, model) -> dict[str, object]:
    """{weight key: factors}; every module must sit where a residual is localised (core.blocks.residual_site: a UNet
    transformer's proj_out, a FLUX double block's img_attn.proj), all of one kind."""
    targets = {}
    for key, (module, factors) in low_rank_targets(residual, model).items():
        if residual_site(key) is None:
            raise ValueError(f"{residual.source}: a localized residual patches transformer proj_out weights (UNets) or "
                             f"double_blocks.<i>.img_attn.proj (FLUX) only; module '{module}' targets {key}")
        check_runtime_factors(residual.source, module, factors)
        targets[key] = factors
    if on_joint_attention(targets) and not cc.joint_attention_text_first(model):
        raise ValueError(f"{cc.model_name(model)}: its double blocks put the image tokens before the text tokens; "
                         f"Apply Localized Residual reads FLUX's order (text first) only")
    return targets


def on_joint_attention(targets: dict) -> bool:
    """Whether the residual's layers are localised by a DiT's joint attention (FLUX double blocks)."""
    return any(residual_site(key)[2] == JOINT_ATTENTION for key in targets)


def concept_token_stream(targets: dict) -> str | None:
    """The token stream the concept words are found in: T5 for FLUX's joint attention, CLIP-L for a UNet's."""
    return cc.T5_TOKENS if on_joint_attention(targets) else None


def install_residuals(patched, settings: LocalizedResidualSettings, targets: dict, strength: float) -> None:
    """Attention capture for each residual block, chained to prior patches (UNet: attn2 on every transformer of the
    block; FLUX: the double block's replacement, for its text length, and one attention override for their joint
    attention), the residual layers' forwards plus the residual, a fresh record every sampling run, and the model's
    own state."""
    shapes = cc.weight_shapes(patched)
    joint_blocks = set()
    for key, factors in targets.items():
        path, block, kind = residual_site(key)
        if kind == JOINT_ATTENTION:
            joint_blocks.add(block)
            prior = cc.dit_block_replace_patch(patched, "double_block", block[1])
            cc.set_dit_block_replace_patch(patched, double_block_capture(block, prior), "double_block", block[1])
        else:
            depth = sum(1 for k in shapes
                        if k.startswith(f"{path}.transformer_blocks.") and k.endswith(".attn2.to_q.weight"))
            for index in range(depth):
                transformer = (*block, index)
                cc.set_attn2_replace_patch(patched, attn2_capture(block, cc.attn2_replace_patch(patched, transformer)),
                                           transformer)
        add_to_forward(patched, key, shapes[key], {RESIDUAL: (factors, strength)}, residual_where_attended(block))
    if joint_blocks:
        cc.set_attention_override(patched, joint_attention_capture(frozenset(joint_blocks),
                                                                   cc.attention_override(patched)))

    def fresh_state_each_run(executor, *args, **kwargs):
        # The sampled patcher's own transformer_options get a new state (not a reset of the one it holds): ComfyUI
        # 0.3.75 deep-copies model_options into a clone (LocalizedResidualState.__deepcopy__ gives it its own), newer
        # releases copy only the dicts and share the state object with every clone. A new state per run keeps each
        # patcher's masks its own under both.
        options = cc.sampling_options(executor).get("transformer_options", {})  # this run's copy
        state = options.get(STATE_KEY)
        if state is not None:
            options[STATE_KEY] = LocalizedResidualState(state.settings)
            cc.set_transformer_option(cc.sampled_patcher(executor), STATE_KEY, options[STATE_KEY])  # for Show Mask
        return executor(*args, **kwargs)
    cc.add_outer_sample_wrapper(patched, STATE_KEY, fresh_state_each_run)
    cc.set_transformer_option(patched, STATE_KEY, LocalizedResidualState(settings))
    publish_call_options(patched)


class ApplyLocalizedResidual(PackNode):
    """Personalized Residuals with localized attention-guided sampling (LAG): each transformer block's proj_out
    residual acts only where the concept words' cross-attention is, W x + M ⊙ ΔW x. Chains to other packs' attention
    patches; no extra UNet passes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ApplyLocalizedResidual", "Apply Localized Residual", inputs=[
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
                strength_input("strength", "Multiplier of the residual; 0 returns the model untouched.", limit=5.0),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with localized residuals."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt, encoded with this CLIP."),
            ],
        )

    @classmethod
    def execute(cls, model, residual: Adapter, clip, prompt: str, concept_words: str, lag: bool, threshold_mode: str,
                threshold: float, start_percent: float, end_percent: float, strength: float) -> io.NodeOutput:
        targets = residual_targets(outside_text_encoder(residual), model)
        positions = concept_positions(clip, prompt, concept_words, concept_token_stream(targets))
        if strength == 0 or residual.strength == 0:
            return io.NodeOutput(model, clip.encode_from_tokens_scheduled(clip.tokenize(prompt)))
        _, clip = with_text_encoder_part(residual, model, clip, strength)
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        sigma_range = (cc.percent_to_sigma(model, end_percent), cc.percent_to_sigma(model, start_percent))
        settings = LocalizedResidualSettings(tuple(positions), threshold_mode, threshold, sigma_range, lag)
        patched = model.clone()
        install_residuals(patched, settings, targets, strength * residual.strength)
        return io.NodeOutput(patched, conditioning)


class ShowAttentionMask(PackNode):
    """The masks Apply Localized Residual used during the last sampling run of its model."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "ShowAttentionMask", "Show Attention Mask", inputs=[
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
        state = cc.transformer_option(model, STATE_KEY)
        if state is None:
            raise ValueError("this model has no localized residual; connect the MODEL output of Apply Localized Residual")
        if not state.recorded:
            raise ValueError("no attention masks were recorded: sample with this model with LAG on first")
        height, width = samples["samples"].shape[-2:]
        patch = cc.dit_patch_size(model)  # a DiT's masks are flat, one value per image token (patch x patch latents)
        grid_size = (-(-height // patch), -(-width // patch))
        recorded = {sigma: {block: image_masks(m, *grid_size) for block, m in masks.items()}
                    for sigma, masks in state.recorded.items()}
        grid = mask_grid(recorded, steps_shown, cell=64)
        sigmas = evenly_spaced(sorted(recorded, reverse=True), steps_shown)  # mask_grid's columns and rows
        blocks = sorted({block for masks in recorded.values() for block in masks})
        mask = final_mask(recorded, height * 8, width * 8)
        return io.NodeOutput(mask_grid_plot(grid, 64, sigmas, blocks)[None], mask)


class NewResidualAdapter(PackNode):
    """A Personalized Residuals adapter for this model: one low-rank residual on every transformer's proj_out, rank =
    fraction x channels (5%: 16/32/64 for 320/640/1280). Train it, or use a random one to try the nodes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(cls, "NewResidualAdapter", "New Residual Adapter", inputs=[
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
        shapes = {k: s for k, s in cc.weight_shapes(model).items() if residual_site(k)}  # UNet proj_out, FLUX img_attn.proj
        if not shapes:
            raise ValueError(f"{cc.model_name(model)} has no place for a Personalized Residual: it sits on a UNet "
                             f"transformer's proj_out or a FLUX double block's img_attn.proj (core.blocks.residual_site)")
        generator = torch.Generator().manual_seed(seed)
        modules = {generic_module_name(k): new_residual(s, residual_rank(s[0], rank_fraction), generator, init_scale)
                   for k, s in sorted(shapes.items())}
        return io.NodeOutput(Adapter(modules=modules, role="concept", method="personalized-residuals",
                                     base=cc.model_name(model), source="New Residual Adapter"))
