"""Attention-localized residuals (Personalized Residuals + LAG, Ham et al., CVPR 2024).

One low-rank residual ΔW_i = A_i B_i per transformer block, on its output projection proj_out, of rank
about 5% of the block's channels. With localized attention-guided sampling (LAG) the residual acts only
where the concept's cross-attention says the concept is:

    out = W x + M ⊙ (ΔW x),   M = binarize(Σ_concept tokens softmax(q kᵀ / √d), averaged over heads)

No extra UNet evaluations: the attention of the concept token columns is computed next to the normal
attention, from the same q and k.
"""
from __future__ import annotations

import torch

from .adapter import LowRank, new_lowrank

THRESHOLD_MODES = ("median", "fixed value", "top-k percent")
DEFAULT_RANK_FRACTION = 0.05


def residual_rank(channels: int, fraction: float = DEFAULT_RANK_FRACTION) -> int:
    """5% of the channels by default: 16 / 32 / 64 for 320 / 640 / 1280."""
    return max(1, round(channels * fraction))


def new_residual(weight_shape: tuple[int, ...], rank: int, generator: torch.Generator, init_scale: float) -> LowRank:
    """Factors for one proj_out residual: down ~ N(0, 1/channels); up N(0, init_scale²) (0: training start)."""
    return new_lowrank(weight_shape, rank, generator, up_std=init_scale)


def find_token_positions(prompt_tokens: list[int], word_tokens: list[int]) -> list[int]:
    """Positions of every occurrence of a word's token sequence in the prompt's token sequence."""
    if not word_tokens:
        return []
    width = len(word_tokens)
    found = []
    for start in range(len(prompt_tokens) - width + 1):
        if prompt_tokens[start:start + width] == word_tokens:
            found.extend(range(start, start + width))
    return found


def concept_attention(q: torch.Tensor, k: torch.Tensor, heads: int, positions: list[int]) -> torch.Tensor:
    """Cross-attention probability mass on the concept token columns, averaged over heads: (B, N).

    q: (B, N, heads·d) projected queries, k: (B, T, heads·d) projected keys. The softmax is taken over
    all T tokens; only the concept columns are kept.
    """
    batch, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(batch, n, heads, d).transpose(1, 2).float()
    kh = k.reshape(batch, k.shape[1], heads, d).transpose(1, 2).float()
    probabilities = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1)
    return probabilities[..., positions].sum(-1).mean(1)


def joint_concept_attention(q: torch.Tensor, k: torch.Tensor, text_length: int, positions: list[int]) -> torch.Tensor:
    """MMDiT joint attention (FLUX double blocks, text tokens first): the image queries' attention probability mass
    on the concept's text token columns, averaged over heads: (B, N) for the N = L - text_length image tokens.

    q, k: (B, heads, L, d), as the block hands them to attention (normalised, RoPE applied). The softmax runs over all
    L keys, text and image, as the block's own attention does; one head at a time (an L x L map per head)."""
    heads, d = q.shape[1], q.shape[-1]
    total = None
    for head in range(heads):
        logits = (q[:, head, text_length:].float() @ k[:, head].float().transpose(-1, -2)) * d ** -0.5
        mass = (logits[..., positions] - logits.logsumexp(-1, keepdim=True)).exp().sum(-1)
        total = mass if total is None else total + mass
    return total / heads


def image_masks(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N) masks of a DiT's image tokens -> (B, height, width) of the picture's patches (the first height·width
    tokens: reference-image tokens after them, as FLUX Kontext appends, are not the picture); (B, h, w) unchanged."""
    if masks.dim() == 3:
        return masks
    if masks.shape[1] < height * width:
        raise ValueError(f"{masks.shape[1]} image tokens cannot be a {height}x{width} patch grid")
    return masks[:, :height * width].reshape(-1, height, width)


def binarize(attention: torch.Tensor, mode: str, value: float) -> torch.Tensor:
    """(B, N) attention -> (B, N) mask of 0 / 1, per sample.

    median: above the sample's median. fixed value: above ``value`` after scaling the sample to [0, 1].
    top-k percent: the ``value`` percent of positions with the most attention.
    """
    if mode == "median":
        return (attention > attention.median(dim=1, keepdim=True).values).to(attention.dtype)
    if mode == "fixed value":
        low, high = attention.amin(1, keepdim=True), attention.amax(1, keepdim=True)
        scaled = (attention - low) / (high - low).clamp_min(1e-12)
        return (scaled > value).to(attention.dtype)
    if mode == "top-k percent":
        count = round(attention.shape[1] * min(max(value, 0.0), 100.0) / 100.0)
        mask = torch.zeros_like(attention)
        if count > 0:
            mask.scatter_(1, attention.topk(count, dim=1).indices, 1.0)
        return mask
    raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")


def share_conditional_mask(attention: torch.Tensor, cond_or_uncond: list[int]) -> torch.Tensor:
    """Under CFG the batch holds cond (0) and uncond (1) chunks: every chunk gets the cond chunk's map."""
    if not cond_or_uncond or 0 not in cond_or_uncond or len(set(cond_or_uncond)) == 1:
        return attention
    chunks = attention.chunk(len(cond_or_uncond))
    cond = chunks[cond_or_uncond.index(0)]
    return torch.cat([cond for _ in cond_or_uncond])


def evenly_spaced(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else [items[-1]]


def mask_grid(recorded: dict[float, dict[tuple, torch.Tensor]], columns: int, cell: int, sample: int = 0) -> torch.Tensor:
    """An (H, W) image: one row per block, one column per step (up to ``columns``, evenly spaced)."""
    sigmas = evenly_spaced(sorted(recorded, reverse=True), columns)
    blocks = sorted({b for masks in recorded.values() for b in masks})
    grid = torch.zeros(len(blocks) * cell, len(sigmas) * cell)
    for col, sigma in enumerate(sigmas):
        for row, block in enumerate(blocks):
            mask = recorded[sigma].get(block)
            if mask is not None:
                cell_image = torch.nn.functional.interpolate(mask[sample][None, None].float(), size=(cell, cell),
                                                             mode="nearest")[0, 0]
                grid[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell] = cell_image
    return grid


def final_mask(recorded: dict[float, dict[tuple, torch.Tensor]], height: int, width: int) -> torch.Tensor:
    """(B, height, width): the last step's masks of all blocks, resized and averaged."""
    masks = recorded[min(recorded)].values()
    resized = [torch.nn.functional.interpolate(m[:, None].float(), size=(height, width), mode="nearest")[:, 0]
               for m in masks]
    return torch.stack(resized).mean(0)
