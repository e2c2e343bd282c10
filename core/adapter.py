"""The ADAPTER value: per target module, low-rank factors or ComfyUI's own tensors, with a role, a method, a base and a
strength.

A plain low-rank module (``LowRank``, the pack's native type: merges, runtime adapters and training use its math)
changes its weight by ΔW = scale · up @ down with scale = alpha / rank, or 1 when the file has no alpha (ComfyUI's and
diffusers' convention). Conv layers keep their kernel in ``down`` (r, in, kh, kw) and a 1x1 ``up`` (out, r, 1, 1), the
kohya LoCon layout.

Every other kind ComfyUI's loader reads (LoHa, LoKr, OFT, BOFT, GLoRA, Tucker, DoRA, full-weight / bias / norm diffs,
set weights) is kept as the module's file tensors (``ModuleTensors``); ComfyUI's own weight adapters compute what they
do to the weight, the pack never re-derives it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

ROLES = ("content", "style", "concept", "generic")


@dataclass(frozen=True)
class LowRank:
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. QR-LoRA's base_r

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight change, shaped (out, in, *kernel)."""
        product = self.up.flatten(1).to(dtype) @ self.down.flatten(1).to(dtype)
        return (product * self.scale).reshape(self.delta_shape)

    @property
    def parameter_count(self) -> int:
        return self.up.numel() + self.down.numel()

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.up, self.down, *self.extras.values()))


    def shaped_like(self, weight_shape: tuple[int, ...]) -> "LowRank":
        """The same ΔW with conv factors in the kohya LoCon layout, for a 4-D weight (2-D factors of a conv, as
        ComfyUI's trainer writes them, otherwise cannot merge with factors that keep the kernel)."""
        if len(weight_shape) != 4 or self.down.ndim == 4:
            return self
        up = self.up.reshape(self.up.shape[0], self.rank, 1, 1)
        return LowRank(up=up, down=self.down.reshape(self.rank, *weight_shape[1:]), alpha=self.alpha, extras=self.extras)


BIAS_PARTS = ("diff_b", "b_norm")  # ComfyUI applies these parts to the module's bias, every other part to its weight


@dataclass(frozen=True)
class ModuleTensors:
    """One module's tensors of the kinds ComfyUI's loader reads beside plain low-rank factors, keyed by ComfyUI's own
    key suffix ('hada_w1_a', 'diff_b', 'lora_up.weight', 'alpha', ...); ``kinds`` names them ('loha', 'bias diff')."""

    kinds: tuple[str, ...]
    tensors: dict[str, torch.Tensor]

    @property
    def weight_kinds(self) -> tuple[str, ...]:
        """The kinds that change the module's weight (not 'bias diff')."""
        return tuple(kind for kind in self.kinds if kind != "bias diff")

    @property
    def changes_weight(self) -> bool:
        return any(part not in BIAS_PARTS for part in self.tensors)

    @property
    def changes_bias(self) -> bool:
        return any(part in BIAS_PARTS for part in self.tensors)

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for part, t in self.tensors.items() if part != "alpha")

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def kind_counts(low_rank_count: int, module_tensors) -> dict[str, int]:
    """{kind: modules of that kind}: plain low-rank modules count as 'lora'."""
    counts = {"lora": low_rank_count} if low_rank_count else {}
    for tensors in module_tensors:
        for kind in tensors.kinds:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def check_factors(module: str, up: torch.Tensor, down: torch.Tensor) -> None:
    """Raise ValueError naming the module when up and down cannot form a LoRA (rank 0 included)."""
    if up.ndim not in (2, 4) or down.ndim not in (2, 4):
        raise ValueError(f"module '{module}': factors must be 2-D (linear) or 4-D (conv); "
                         f"got up {tuple(up.shape)}, down {tuple(down.shape)}")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"module '{module}': rank mismatch, up is {tuple(up.shape)} but down is {tuple(down.shape)} "
                         f"(up's 2nd dimension must equal down's 1st)")
    if up.ndim == 4 and up.shape[2:] != (1, 1):
        raise ValueError(f"module '{module}': conv up factor must be 1x1, got {tuple(up.shape)}")
    if up.numel() == 0 or down.numel() == 0:
        raise ValueError(f"module '{module}': empty factors (up {tuple(up.shape)}, down {tuple(down.shape)}, rank "
                         f"{down.shape[0]}): an adapter of rank 0 changes nothing, so the file is probably broken")


@dataclass(frozen=True)
class Adapter:
    """Per module name (any spelling the model's key map understands): low-rank factors in ``modules``, every other
    kind in ``module_tensors`` (a module may be in both: low-rank factors and a bias diff). ``ignored_keys`` names the
    file keys the pack does not use, with the reason ({key: reason})."""

    modules: dict[str, LowRank]
    role: str = "generic"
    method: str = "lora"
    base: str = "unknown"
    strength: float = 1.0
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    module_tensors: dict[str, ModuleTensors] = field(default_factory=dict)
    ignored_keys: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    def replace(self, **changes) -> "Adapter":
        return dataclasses.replace(self, **changes)

    def subset(self, names) -> "Adapter":
        names = set(names)
        return self.replace(modules={n: f for n, f in self.modules.items() if n in names},
                            module_tensors={n: t for n, t in self.module_tensors.items() if n in names})

    @property
    def module_names(self) -> list[str]:
        return sorted({*self.modules, *self.module_tensors})

    @property
    def kinds(self) -> dict[str, int]:
        return kind_counts(len(self.modules), self.module_tensors.values())

    @property
    def parameter_count(self) -> int:
        return sum(m.parameter_count for m in (*self.modules.values(), *self.module_tensors.values()))

    @property
    def size_bytes(self) -> int:
        return sum(m.size_bytes for m in (*self.modules.values(), *self.module_tensors.values()))

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    def cross_attention_width(self) -> int | None:
        """Input width of the cross-attention key projections: 768 SD1.x, 1024 SD2.x, 2048 SDXL."""
        widths = {m.down.shape[1] for name, m in self.modules.items()
                  if name.replace(".", "_").endswith("attn2_to_k")}
        return widths.pop() if len(widths) == 1 else None


def apply_lowrank(x: torch.Tensor, factors: LowRank, channels_last: bool) -> torch.Tensor:
    """ΔW x without forming ΔW: x is (..., C) for a Linear, (B, C, H, W) for a 1x1 conv."""
    up = factors.up.flatten(1).to(x.dtype)
    down = factors.down.flatten(1).to(x.dtype)
    if channels_last:
        return (x @ down.T @ up.T) * factors.scale
    return torch.einsum("or,ri,bihw->bohw", up, down, x) * factors.scale


def mask_like_output(mask: torch.Tensor, output: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A (B, N) mask shaped to broadcast over a layer output (B, N, C) or (B, C, H, W)."""
    if channels_last:
        return mask[:, :, None].to(output.dtype)
    return mask.reshape(output.shape[0], 1, output.shape[2], output.shape[3]).to(output.dtype)


def add_lowrank_output(out: torch.Tensor, x: torch.Tensor, factors: LowRank, strength: float, channels_last: bool,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """out + M ⊙ (strength · ΔW x): a layer's output with a low-rank term added, only where the (B, N) mask
    is 1 (everywhere when mask is None)."""
    term = apply_lowrank(x, factors, channels_last) * strength
    if mask is not None:
        term = term * mask_like_output(mask, out, channels_last)
    return out + term


def is_pointwise_weight(shape: tuple[int, ...]) -> bool:
    """A Linear weight (out, in) or a 1x1 conv weight (out, in, 1, 1): the same map at every pixel."""
    return len(shape) == 2 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))


def new_lowrank(weight_shape: tuple[int, ...], rank: int, generator: torch.Generator,
                up_std: float | None = None) -> LowRank:
    """Fresh LoRA factors for a layer, scale 1: down ~ N(0, 1/in); up = 0 (the layer starts unchanged) or,
    given up_std, N(0, up_std²) (up is then drawn after down, even when up_std is 0)."""
    out_dim, in_dim = weight_shape[0], weight_shape[1]
    kernel = tuple(weight_shape[2:])
    down = torch.randn(rank, in_dim, *kernel, generator=generator) / in_dim ** 0.5
    up_shape = (out_dim, rank, *([1] * len(kernel)))
    up = torch.zeros(up_shape) if up_std is None else torch.randn(up_shape, generator=generator) * up_std
    return LowRank(up=up, down=down, alpha=None)


def trainable_lowrank(weight_shape: tuple[int, ...], rank: int, generator: torch.Generator) -> LowRank:
    """A LoRA ready to train: new_lowrank with up = 0 (training starts at the base model), gradients on."""
    factors = new_lowrank(weight_shape, rank, generator)
    return LowRank(up=factors.up.requires_grad_(), down=factors.down.requires_grad_(), alpha=None)
