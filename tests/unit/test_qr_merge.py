"""QR-LoRA factorisation and merges against independent dense float64 references."""
import pytest
import torch

from core.adapter import LowRank
from core.merge import Term, merge_layer, overlap_summary, principal_cosines
from core.qr_lora import convert_to_qr_lora, qr_factorise

F64 = torch.float64


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def lora(out_dim, in_dim, rank, kernel=(), alpha=None, seed=0):
    return LowRank(up=rand(out_dim, rank, *([1] * len(kernel)), seed=seed),
                   down=rand(rank, in_dim, *kernel, seed=seed + 1000), alpha=alpha)


def dense(f: LowRank):
    return (f.up.flatten(1) @ f.down.flatten(1)).reshape(f.delta_shape) * f.scale


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_joint_basis_merge_equals_weighted_sum(kernel):
    terms = [Term(lora(40, 24, 3, kernel, alpha=1.5, seed=1), 0.7, "content"),
             Term(lora(40, 24, 5, kernel, seed=2), -0.3, "content"),
             Term(lora(40, 24, 4, kernel, alpha=8.0, seed=3), 1.2, "style")]
    merged = merge_layer(terms, dtype=F64)
    reference = sum(t.weight * dense(t.factors) for t in terms)
    assert merged.path == "joint-basis"
    assert merged.factors.rank == 12 and merged.factors.delta_shape == (40, 24, *kernel)
    assert torch.allclose(merged.factors.delta(F64), reference, atol=1e-10, rtol=0)
    q = merged.factors.up.flatten(1)
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=F64), atol=1e-12)


def test_merge_when_ranks_exceed_the_output_width():
    terms = [Term(lora(6, 30, 4, seed=4), 1.0, "content"), Term(lora(6, 30, 5, seed=5), 0.5, "style")]
    merged = merge_layer(terms, dtype=F64)
    assert merged.factors.rank == 6
    assert torch.allclose(merged.factors.delta(F64), sum(t.weight * dense(t.factors) for t in terms), atol=1e-10)


def qr_setup(out_dim=32, in_dim=20, rank=6, seed=10):
    q, _ = torch.linalg.qr(rand(out_dim, rank, seed=seed))
    return q, rand(rank, in_dim, seed=seed + 1), rand(rank, in_dim, seed=seed + 2), rand(rank, in_dim, seed=seed + 3)


def test_shared_q_merge_is_the_official_formula():
    q, base_r, delta_c, delta_s = qr_setup()
    w_res = rand(32, 20, seed=99)
    w0 = w_res + q @ base_r
    lam_c, lam_s = 0.8, 1.3
    official = q @ (base_r + lam_c * delta_c + lam_s * delta_s) + w_res
    terms = [Term(LowRank(q, delta_c, extras={"base_r": base_r}), lam_c, "content"),
             Term(LowRank(q.clone(), delta_s), lam_s, "style")]
    merged = merge_layer(terms, dtype=F64)
    assert merged.path == "shared-q" and merged.factors.rank == 6
    assert torch.allclose(w0 + merged.factors.delta(F64), official, atol=1e-12)


def test_shared_q_tolerates_column_sign_flips():
    q, _, delta_c, delta_s = qr_setup(seed=20)
    flips = torch.tensor([1, -1, 1, 1, -1, -1], dtype=F64)
    terms = [Term(LowRank(q, delta_c), 1.0, "content"), Term(LowRank(q * flips, delta_s), 0.5, "style")]
    merged = merge_layer(terms, dtype=F64)
    assert merged.path == "shared-q"
    expected = q @ delta_c + 0.5 * (q * flips) @ delta_s
    assert torch.allclose(merged.factors.delta(F64), expected, atol=1e-12)


def test_zero_strengths_give_a_zero_delta():
    terms = [Term(lora(8, 8, 2, seed=30), 0.0, "content"), Term(lora(8, 8, 3, seed=31), 0.0, "style")]
    assert torch.count_nonzero(merge_layer(terms, dtype=F64).factors.delta(F64)) == 0


def test_overlap_is_one_for_identical_and_zero_for_orthogonal_subspaces():
    basis, _ = torch.linalg.qr(rand(20, 8, seed=40))
    a, b = basis[:, :4], basis[:, 4:]
    mix = rand(4, 4, seed=41)  # same subspace, other basis
    assert torch.allclose(principal_cosines(a, a @ mix), torch.ones(4, dtype=F64), atol=1e-10)
    assert torch.allclose(principal_cosines(a, b), torch.zeros(4, dtype=F64), atol=1e-10)
    same = merge_layer([Term(LowRank(a, rand(4, 9, seed=42)), 1, "content"),
                        Term(LowRank(a @ mix, rand(4, 9, seed=43)), 1, "style")], dtype=F64)
    assert torch.allclose(same.overlap.column_cosines, torch.ones(4, dtype=F64), atol=1e-10)
    apart = merge_layer([Term(LowRank(a, rand(4, 9, seed=44)), 1, "content"),
                         Term(LowRank(b, rand(4, 9, seed=45)), 1, "style")], dtype=F64)
    assert apart.overlap.column_cosines.max() < 1e-10
    summary = overlap_summary({"layer": apart})
    assert summary[0] == "1 layers: 1 joint-basis" and "overlap out max 0.000" in summary[1]


def test_interference_removal_takes_content_input_directions_out_of_style():
    content, style = lora(16, 12, 3, seed=50), lora(16, 12, 4, seed=51)
    merged = merge_layer([Term(content, 1.0, "content"), Term(style, 2.0, "style")],
                         interference="style without content directions", dtype=F64)
    style_part = merged.factors.delta(F64) - dense(content)
    content_rows, _ = torch.linalg.qr(content.down.T)  # (12, 3): content's input directions
    assert torch.allclose(style_part @ content_rows, torch.zeros(16, 3, dtype=F64), atol=1e-10)
    projector = torch.eye(12, dtype=F64) - content_rows @ content_rows.T
    assert torch.allclose(style_part, 2.0 * dense(style) @ projector, atol=1e-10)
    both = merge_layer([Term(content, 1.0, "content"), Term(style, 2.0, "style")], interference="both", dtype=F64)
    style_rows, _ = torch.linalg.qr(style.down.T)
    expected = dense(content) @ (torch.eye(12, dtype=F64) - style_rows @ style_rows.T) + 2.0 * dense(style) @ projector
    assert torch.allclose(both.factors.delta(F64), expected, atol=1e-10)
    with pytest.raises(ValueError, match="interference must be one of"):
        merge_layer([Term(content, 1.0, "content")], interference="some")


@pytest.mark.parametrize("shape", [(48, 32), (48, 32, 1, 1), (16, 8, 3, 3)])
def test_qr_factorisation(shape):
    weight = rand(*shape, seed=60)
    f = qr_factorise(weight, 6)
    matrix = weight.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.allclose(f.q @ f.r, (u[:, :6] * s[:6]) @ vh[:6], atol=1e-10)
    assert torch.allclose(f.q.T @ f.q, torch.eye(6, dtype=F64), atol=1e-12)
    assert torch.count_nonzero(torch.tril(f.r, -1)) == 0 and (torch.diagonal(f.r) >= 0).all()
    assert torch.allclose(f.residual + f.q @ f.r, matrix, atol=1e-12)
    again = qr_factorise(weight.clone(), 6)
    assert torch.equal(f.q, again.q), "Q must be deterministic"


def test_qr_factorisation_of_half_precision_weights_runs_in_float32():
    weight = rand(32, 16, seed=61).to(torch.float16)
    f = qr_factorise(weight, 4)
    assert f.q.dtype == torch.float32
    with pytest.raises(ValueError, match="rank must be between 1 and 16"):
        qr_factorise(weight, 17)


def test_conversion_to_qr_lora_keeps_span_and_reports_the_rest():
    weight = rand(24, 16, seed=70)
    f = qr_factorise(weight, 5)
    inside = f.q @ rand(5, 16, seed=71)
    converted = convert_to_qr_lora(weight, inside, 5)
    assert converted.residual_ratio < 1e-12
    assert torch.allclose(converted.factors.delta(F64), inside, atol=1e-12)
    assert torch.equal(converted.factors.up, f.q) and torch.equal(converted.factors.extras["base_r"], f.r)
    outside = rand(24, 16, seed=72)
    converted = convert_to_qr_lora(weight, outside, 5)
    projected = f.q @ (f.q.T @ outside)
    assert torch.allclose(converted.factors.delta(F64), projected, atol=1e-12)
    expected = torch.linalg.matrix_norm(outside - projected) / torch.linalg.matrix_norm(outside)
    assert converted.residual_ratio == pytest.approx(float(expected), rel=1e-12)


def test_principal_cosines_of_rank_deficient_factors_use_the_exact_path():
    basis, _ = torch.linalg.qr(rand(20, 6, seed=80))
    a = torch.cat([basis[:, :3], basis[:, :1] * 2.0], 1)  # rank 3 with 4 columns: Gram matrix is singular
    b = torch.cat([basis[:, :2], basis[:, 3:5]], 1)
    cosines = principal_cosines(a, b)
    assert torch.allclose(cosines, torch.tensor([1.0, 1.0, 0.0], dtype=F64), atol=1e-10)
    fast = principal_cosines(basis[:, :3] @ rand(3, 3, seed=81), basis[:, 1:4])
    assert torch.allclose(fast, torch.tensor([1.0, 1.0, 0.0], dtype=F64), atol=1e-8)
