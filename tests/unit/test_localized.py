"""core.localized: token lookup, concept attention, masks and the masked residual, against dense references."""
import pytest
import torch

from core.adapter import LowRank, add_lowrank_output
from core.blocks import residual_site
from core.localized import (binarize, concept_attention, find_token_positions, final_mask, image_masks,
                            joint_concept_attention, mask_grid, residual_rank, share_conditional_mask)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_token_positions_find_every_multi_token_occurrence():
    assert find_token_positions([1, 5, 6, 7, 2, 5, 6, 9], [5, 6]) == [1, 2, 5, 6]
    assert find_token_positions([1, 2, 3], [4]) == []
    assert find_token_positions([1, 2, 3], []) == []


def test_concept_attention_is_the_softmax_mass_on_concept_columns_averaged_over_heads():
    q, k = rand(2, 6, 8, seed=1), rand(2, 5, 8, seed=2)
    heads, d = 2, 4
    got = concept_attention(q, k, heads, [1, 3])
    expected = torch.zeros(2, 6)
    for h in range(heads):
        qh, kh = q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d]
        p = torch.softmax(qh @ kh.transpose(1, 2) / d ** 0.5, dim=-1)
        expected += (p[..., 1] + p[..., 3]) / heads
    assert torch.allclose(got, expected, atol=1e-6)


def test_joint_concept_attention_is_the_image_queries_mass_on_concept_text_columns():
    """FLUX's double-block joint attention: keys and queries of 3 text tokens then 5 image tokens; the softmax of each
    image query runs over all 8 keys, and only the concept text columns' mass is kept (float64 reference)."""
    q, k = rand(2, 3, 8, 4, seed=3).double(), rand(2, 3, 8, 4, seed=4).double()
    expected = torch.zeros(2, 5, dtype=torch.float64)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                logits = torch.stack([q[b, h, 3 + i] @ k[b, h, j] for j in range(8)]) / 2.0  # √d = 2
                p = logits.exp() / logits.exp().sum()
                expected[b, i] += (p[0] + p[2]) / 3
    got = joint_concept_attention(q.float(), k.float(), 3, [0, 2])
    assert got.shape == (2, 5) and torch.allclose(got.double(), expected, atol=1e-6)


def test_image_masks_take_the_pictures_patch_grid_from_flat_image_tokens():
    flat = torch.arange(2 * 7).reshape(2, 7).float()  # a 2x3 grid and one reference-image token after it
    assert image_masks(flat, 2, 3).tolist() == [[[0, 1, 2], [3, 4, 5]], [[7, 8, 9], [10, 11, 12]]]
    grid = torch.zeros(1, 2, 3)
    assert image_masks(grid, 2, 3) is grid
    with pytest.raises(ValueError, match="7 image tokens cannot be a 3x3 patch grid"):
        image_masks(flat, 3, 3)


def test_residual_sites_are_unet_proj_out_and_flux_double_block_image_attention_outputs():
    assert residual_site("diffusion_model.input_blocks.1.1.proj_out.weight") == (
        "diffusion_model.input_blocks.1.1", ("input", 1), "cross attention")
    assert residual_site("diffusion_model.double_blocks.3.img_attn.proj.weight") == (
        "diffusion_model.double_blocks.3", ("double", 3), "joint attention")
    for other in ("diffusion_model.double_blocks.3.txt_attn.proj.weight", "diffusion_model.single_blocks.0.linear2.weight",
                  "diffusion_model.double_blocks.3.img_attn.proj.bias", "diffusion_model.input_blocks.1.1.proj_in.weight"):
        assert residual_site(other) is None


def test_binarize_modes():
    a = torch.tensor([[0.1, 0.5, 0.3, 0.9], [4.0, 1.0, 2.0, 3.0]])
    assert binarize(a, "median", 0).tolist() == [[0, 1, 0, 1], [1, 0, 0, 1]]
    assert binarize(a, "fixed value", 0.5).tolist() == [[0, 1, 0, 1], [1, 0, 0, 1]]
    assert binarize(a, "fixed value", 1.5).sum() == 0 and binarize(a, "fixed value", -1).sum() == 8
    assert binarize(a, "top-k percent", 25).tolist() == [[0, 0, 0, 1], [1, 0, 0, 0]]
    assert binarize(a, "top-k percent", 100).sum() == 8
    with pytest.raises(ValueError, match="threshold mode must be one of"):
        binarize(a, "mean", 0)


@pytest.mark.parametrize("channels_last", [True, False])
def test_lowrank_output_with_mask_equals_dense_reference_inside_and_base_outside(channels_last):
    c, r, b, h, w = 8, 2, 2, 3, 4
    factors = LowRank(up=rand(c, r, seed=3) if channels_last else rand(c, r, 1, 1, seed=3),
                      down=rand(r, c, seed=4) if channels_last else rand(r, c, 1, 1, seed=4), alpha=1.0)
    delta = factors.delta().reshape(c, c)
    mask = (rand(b, h * w, seed=5) > 0).float()
    if channels_last:
        x, base = rand(b, h * w, c, seed=6), rand(b, h * w, c, seed=7)
        expected = base + mask[..., None] * 0.7 * (x @ delta.T)
    else:
        x, base = rand(b, c, h, w, seed=6), rand(b, c, h, w, seed=7)
        expected = base + mask.reshape(b, 1, h, w) * 0.7 * torch.einsum("oi,bihw->bohw", delta, x)
    got = add_lowrank_output(base, x, factors, 0.7, channels_last, mask)
    assert torch.allclose(got, expected, atol=1e-5)
    outside = (mask == 0)[..., None].expand_as(base) if channels_last else (mask == 0).reshape(b, 1, h, w).expand_as(base)
    assert torch.equal(got[outside], base[outside])
    assert torch.equal(add_lowrank_output(base, x, factors, 1.0, channels_last, torch.zeros(b, h * w)), base)
    everywhere = add_lowrank_output(base, x, factors, 0.7, channels_last, None)
    assert torch.allclose(everywhere, add_lowrank_output(base, x, factors, 0.7, channels_last, torch.ones(b, h * w)))


def test_cfg_chunks_share_the_conditional_map():
    cond, uncond = rand(2, 5, seed=8), rand(2, 5, seed=9)
    shared = share_conditional_mask(torch.cat([uncond, cond]), [1, 0])
    assert torch.equal(shared, torch.cat([cond, cond]))
    assert torch.equal(share_conditional_mask(cond, [0]), cond)


def test_rank_and_mask_pictures():
    assert [residual_rank(c) for c in (320, 640, 1280)] == [16, 32, 64]
    recorded = {14.0: {("input", 1): torch.ones(2, 4, 4, dtype=torch.bool)},
                1.0: {("input", 1): torch.zeros(2, 4, 4, dtype=torch.bool), ("output", 1): torch.ones(2, 2, 2, dtype=torch.bool)}}
    grid = mask_grid(recorded, columns=8, cell=8)
    assert grid.shape == (16, 16) and grid[:8, :8].min() == 1 and grid[:8, 8:].max() == 0 and grid[8:, 8:].min() == 1
    final = final_mask(recorded, 16, 16)
    assert final.shape == (2, 16, 16) and torch.allclose(final, torch.full((2, 16, 16), 0.5))
