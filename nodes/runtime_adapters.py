"""Low-rank adapters added at run time: a layer's forward plus strength · ΔW x, chosen per UNet call.

Three features use it: the Content-Style Guider switches adapters between the UNet calls of one step,
Apply Localized Residual masks a residual by the concept's attention, and IPL training compares the
frozen and the adapted prediction of one model. The weights are never re-patched per call.

How a patched layer knows what to do in a call: an APPLY_MODEL wrapper publishes the call's
transformer_options (a context variable, set for the duration of that call only), and the layer's
``select(options)`` returns the adapter names to add and an optional (B, N) mask. Nothing is shared
between clones of a model: the options belong to the sampling run, and whatever a feature keeps per
model lives in its transformer_options, which every clone copies (0.3.75 deep-copies them; newer releases copy the
dicts and share the values, so a value a feature changes per run is replaced, never mutated: see
localized_residual's fresh state per run).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch.utils.checkpoint

from ..core.adapter import Adapter, LowRank, add_lowrank_output
from . import comfy_compat as cc
from .model_binding import bind_to_model, whole_targets
from ..core import metadata as META

ACTIVE_KEY = META.ACTIVE_ADAPTERS  # transformer option: frozenset of adapter names switched on for a call
CALL_WRAPPER_KEY = META.RUNTIME_ADAPTERS
_CALL_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("csa_call_options", default=None)


def call_options() -> dict:
    """The transformer_options of the UNet call running now ({} outside one)."""
    return _CALL_OPTIONS.get() or {}


@contextlib.contextmanager
def _publish(transformer_options: dict):
    token = _CALL_OPTIONS.set(transformer_options)
    try:
        yield
    finally:
        _CALL_OPTIONS.reset(token)


def publish_call_options(model) -> None:
    """Make each UNet call's transformer_options readable by the patched layers (once per model)."""
    cc.around_each_model_call(model, CALL_WRAPPER_KEY, _publish)


def checkpointed(forward):
    """``forward`` under torch's activation checkpointing (recomputed in the backward pass), with the call's
    transformer_options published again during the recomputation, so the run-time adapters inside add what they
    added in the forward pass."""
    def run(*args, **kwargs):
        options = call_options()

        def again(*a, **k):
            with _publish(options):
                return forward(*a, **k)
        return torch.utils.checkpoint.checkpoint(again, *args, use_reentrant=False, **kwargs)
    return run


_ANCHOR = torch.zeros((), requires_grad=True)  # an input that needs grad: a re-entrant checkpoint's output then does


def checkpointed_in_place_safe(forward):
    """``forward`` checkpointed for blocks that add into their own tensors in place (FLUX's, other DiTs'): the forward
    runs without saving anything (torch's re-entrant checkpoint); the backward pass runs it again on copies of its
    tensor inputs under ordinary autograd with every saved tensor copied (cc.in_place_safe_autograd), the call's
    options published again. Its gradients reach the trained factors through ``.backward()`` (not autograd.grad)."""
    def run(*args, **kwargs):
        options = call_options()
        arg_tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        kwarg_tensors = [n for n, v in kwargs.items() if isinstance(v, torch.Tensor)]

        def again(_anchor, *tensors):
            a, k = list(args), dict(kwargs)
            for slot, tensor in zip([*arg_tensors, *kwarg_tensors], tensors):
                (a.__setitem__ if isinstance(slot, int) else k.__setitem__)(slot, tensor.clone())
            with _publish(options), cc.in_place_safe_autograd():
                return forward(*a, **k)
        tensors = [args[i] for i in arg_tensors] + [kwargs[n] for n in kwarg_tensors]
        return torch.utils.checkpoint.checkpoint(again, _ANCHOR, *tensors, use_reentrant=True)
    return run


def checkpoint_blocks(model) -> int:
    """Checkpoint every block the diffusion model calls (cc.checkpoint_units); returns how many. UNet layers with
    torch's non-re-entrant checkpoint; a DiT's blocks, which add into their inputs in place, re-entrant
    (checkpointed_in_place_safe)."""
    wrap = checkpointed if cc.is_unet(model) else checkpointed_in_place_safe
    units = cc.checkpoint_units(model)
    for name in units:
        cc.replace_module_forward(model, name, wrap(cc.module_forward(model, name)))
    return len(units)


def low_rank_targets(adapter: Adapter, model) -> dict[str, tuple[str, LowRank]]:
    """{model key: (module, factors)} of an adapter used at run time; other kinds are refused by name (run-time
    adapters add ΔW x from low-rank factors, which LoHa, LoKr, OFT, diffs and the like do not have)."""
    binding = bind_to_model(adapter, model)
    if binding.tensor_targets:
        modules = sorted(module for module, _ in binding.tensor_targets.values())
        kinds = sorted({kind for _, kept in binding.tensor_targets.values() for kind in kept.kinds})
        raise ValueError(f"{adapter.source or 'adapter'}: run-time adapters add low-rank ΔW x, but {len(modules)} "
                         f"modules are {', '.join(kinds)} (first: {modules[:3]}); apply this adapter with Apply "
                         f"Adapters instead")
    return whole_targets(binding, model)


def check_runtime_factors(source: str, module: str, factors: LowRank) -> None:
    """Runtime adapters act on linear and 1x1 conv layers (ΔW x without forming ΔW)."""
    if factors.down.ndim == 4 and factors.down.shape[2:] != (1, 1):
        raise ValueError(f"{source}: module '{module}' is a {tuple(factors.down.shape[2:])} conv; runtime adapters "
                         f"support linear and 1x1 conv layers")


def add_to_forward(model, weight_key: str, weight_shape: tuple[int, ...], terms: dict[str, tuple[LowRank, float]],
                   select) -> None:
    """Object-patch the layer owning ``weight_key``: forward(x) + Σ strength · ΔW x over the chosen terms.

    ``select(options)`` -> (names of terms to add, (B, N) mask or None for everywhere). The layer's current
    forward (another pack's patch included) runs first.
    """
    module = weight_key[: -len(".weight")]
    forward = cc.module_forward(model, module)
    channels_last = len(weight_shape) == 2

    def patched_forward(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        names, mask = select(call_options())
        for name in names:
            factors, strength = terms[name]
            out = add_lowrank_output(out, x, factors, strength, channels_last, mask)
        return out
    cc.replace_module_forward(model, module, patched_forward)


def switched_by_active_set(names: tuple[str, ...]):
    """A select() that adds the terms named in the call's ACTIVE_KEY option (in a fixed order)."""
    def select(options: dict):
        return [n for n in names if n in options.get(ACTIVE_KEY, frozenset())], None
    return select


def install_switched_adapters(model, adapters: dict[str, Adapter], default: frozenset[str]) -> None:
    """Patch a clone so each UNet call adds the adapters named in its ACTIVE_KEY option (``default`` unless a
    caller sets it for a batch of calls with ``cc.with_transformer_option``)."""
    per_layer: dict[str, dict[str, tuple[LowRank, float]]] = {}
    for name, adapter in adapters.items():
        for key, (module, factors) in low_rank_targets(adapter, model).items():
            check_runtime_factors(adapter.source, module, factors)
            per_layer.setdefault(key, {})[name] = (factors, adapter.strength)
    shapes = cc.weight_shapes(model)
    for key, terms in per_layer.items():
        add_to_forward(model, key, shapes[key], terms, switched_by_active_set(tuple(terms)))
    cc.set_transformer_option(model, ACTIVE_KEY, default)
    publish_call_options(model)
