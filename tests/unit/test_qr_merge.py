"""QR-LoRA factorisation and merges against independent dense float64 references."""
import pytest
import torch

from core.adapter import LowRank
from core.merge import (CONCATENATED, JOINT_BASIS, OVERLAP_BOTH, OVERLAP_OFF, OVERLAP_OUTPUT, Term, merge_layer,
                        merge_layers, overlap_summary)
from core.qr_lora import convert_to_qr_lora, qr_factorise
from core.subspaces import principal_cosines

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
    merged = merge_layer(terms, dtype=F64, form=JOINT_BASIS)
    reference = sum(t.weight * dense(t.factors) for t in terms)
    assert merged.path == "joint-basis"
    assert merged.factors.rank == 12 and merged.factors.delta_shape == (40, 24, *kernel)
    assert torch.allclose(merged.factors.delta(F64), reference, atol=1e-10, rtol=0)
    q = merged.factors.up.flatten(1)
    assert torch.allclose(q.T @ q, torch.eye(12, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_concatenated_merge_is_the_weighted_sum_with_no_factorisation(kernel):
    terms = [Term(lora(40, 24, 3, kernel, alpha=1.5, seed=1), 0.7, "content"),
             Term(lora(40, 24, 5, kernel, seed=2), -0.3, "content"),
             Term(lora(40, 24, 4, kernel, alpha=8.0, seed=3), 1.2, "style")]
    merged = merge_layer(terms, dtype=F64)
    assert merged.path == "concatenated"
    assert merged.factors.rank == 12 and merged.factors.delta_shape == (40, 24, *kernel)
    assert merged.factors.alpha is None
    # the factors are the adapters' own, ups scaled by w_i s_i, bit for bit
    up = torch.cat([t.factors.up.flatten(1) * (t.weight * t.factors.scale) for t in terms], 1)
    assert torch.equal(merged.factors.up.flatten(1), up)
    assert torch.equal(merged.factors.down, torch.cat([t.factors.down for t in terms], 0))
    reference = sum(t.weight * dense(t.factors) for t in terms)
    assert torch.allclose(merged.factors.delta(F64), reference, atol=1e-12, rtol=0)


def test_merge_when_ranks_exceed_the_output_width():
    terms = [Term(lora(6, 30, 4, seed=4), 1.0, "content"), Term(lora(6, 30, 5, seed=5), 0.5, "style")]
    reference = sum(t.weight * dense(t.factors) for t in terms)
    concatenated, joint = (merge_layer(terms, dtype=F64, form=form) for form in (CONCATENATED, JOINT_BASIS))
    assert concatenated.factors.rank == 9 and joint.factors.rank == 6
    for merged in (concatenated, joint):
        assert torch.allclose(merged.factors.delta(F64), reference, atol=1e-10)


def test_joint_basis_keeps_shared_up_directions_once():
    """Compact form: a LoRA merged with a rescaled copy of itself plus one sharing half its up-space."""
    content = lora(30, 20, 4, seed=6)
    half_shared = LowRank(up=torch.cat([content.up[:, :2] @ rand(2, 2, seed=7), rand(30, 2, seed=8)], 1),
                          down=rand(4, 20, seed=9))
    terms = [Term(content, 0.8, "content"), Term(LowRank(content.up * 2.0, content.down), 0.3, "style"),
             Term(half_shared, 1.1, "style")]
    reference = sum(t.weight * dense(t.factors) for t in terms)
    joint = merge_layer(terms, dtype=F64, form=JOINT_BASIS)
    assert joint.factors.rank == 6, "4 content directions + 2 new ones"
    assert torch.allclose(joint.factors.delta(F64), reference, atol=1e-10)
    q = joint.factors.up.flatten(1)
    assert torch.allclose(q.T @ q, torch.eye(6, dtype=F64), atol=1e-12)
    assert merge_layer(terms, dtype=F64).factors.rank == 12


def test_interference_removal_always_takes_the_joint_basis():
    terms = [Term(lora(16, 12, 3, seed=10), 1.0, "content"), Term(lora(16, 12, 4, seed=11), 1.0, "style")]
    for form in (CONCATENATED, JOINT_BASIS):
        merged = merge_layer(terms, "style without content directions", dtype=F64, form=form)
        assert merged.path == "joint-basis"
    with pytest.raises(ValueError, match="merged form must be one of"):
        merge_layer(terms, form="stacked")


def test_merging_never_forms_a_dense_delta():
    """A 200000 x 200000 layer: a dense ΔW (320 GB) would not fit; factors and overlap must not need one."""
    wide = 200_000
    terms = [Term(lora(wide, wide, 2, seed=12), 1.0, "content"), Term(lora(wide, wide, 2, seed=13), 0.5, "style")]
    for form in (CONCATENATED, JOINT_BASIS):
        merged = merge_layer(terms, dtype=F64, form=form)
        assert merged.factors.rank == 4 and merged.overlap.column_cosines.shape == (2,)
        assert merged.overlap.column_cosines.max() < 0.01, "random planes in R^200000 are nearly orthogonal"


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


def test_adapters_of_different_dtypes_merge():
    q, _, delta_c, delta_s = qr_setup(seed=25)
    shared = merge_layer([Term(LowRank(q, delta_c), 1.0, "content"), Term(LowRank(q.float(), delta_s.float()), 0.5, "style")])
    assert shared.path == "shared-q" and shared.factors.up.dtype == torch.float32
    terms = [Term(lora(16, 12, 3, seed=26), 1.0, "content"), Term(lora(16, 12, 4, seed=27), 0.5, "style")]
    mixed = [Term(LowRank(t.factors.up.to(d), t.factors.down.to(d)), t.weight, t.role)
             for t, d in zip(terms, (torch.float16, torch.bfloat16))]
    for form in (CONCATENATED, JOINT_BASIS):
        merged = merge_layer(mixed, dtype=F64, form=form)
        reference = sum(t.weight * t.factors.up.double() @ t.factors.down.double() for t in mixed)
        assert torch.allclose(merged.factors.delta(F64), reference, atol=1e-10), form


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
    assert summary[0] == "1 layers: 1 concatenated" and "overlap out max 0.000" in summary[1]


def dense_principal_cosines(delta_a: torch.Tensor, delta_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: principal angles of two dense matrices' column and row spaces via their SVDs."""
    def spaces(delta):
        u, s, vh = torch.linalg.svd(delta.flatten(1), full_matrices=False)
        rank = int((s > 1e-9 * s[0]).sum())
        return u[:, :rank], vh[:rank].T
    (ua, va), (ub, vb) = spaces(delta_a), spaces(delta_b)
    return torch.linalg.svdvals(ua.T @ ub), torch.linalg.svdvals(va.T @ vb)


@pytest.mark.parametrize("dtype, atol", [(F64, 1e-10), (torch.float32, 1e-5)])
def test_overlap_report_matches_dense_principal_angles(dtype, atol):
    basis, _ = torch.linalg.qr(rand(30, 8, seed=90))
    layers = {  # partly shared spaces, two content adapters, a conv layer, a rank-deficient pair, content only
        "linear": [Term(LowRank(basis[:, :4] @ rand(4, 4, seed=91), rand(4, 20, seed=92)), 0.6, "content"),
                   Term(lora(30, 20, 2, seed=93), 1.0, "content"),
                   Term(LowRank(torch.cat([basis[:, 2:7], rand(30, 1, seed=94)], 1), rand(6, 20, seed=95)), 1.3,
                        "style")],
        "conv": [Term(lora(24, 6, 5, (3, 3), seed=96), 1.0, "content"),
                 Term(lora(24, 6, 3, (3, 3), alpha=2.0, seed=97), 0.4, "style")],
        "deficient": [Term(LowRank(torch.cat([basis[:, :3], basis[:, :1] * 2.0], 1), rand(4, 20, seed=98)), 1, "content"),
                      Term(LowRank(torch.cat([basis[:, :2], basis[:, 3:5]], 1), rand(4, 20, seed=99)), 1, "style")],
        "content only": [Term(lora(30, 20, 3, seed=100), 1.0, "content")],
    }
    merged = merge_layers(layers, dtype=dtype)
    for key, terms in layers.items():
        overlap = merged[key].overlap
        if key == "content only":
            assert overlap.column_cosines is None and overlap.row_cosines is None
            continue
        # unit weights: the deltas' spaces are the factors' spaces, which is what the report describes
        content, style = (sum(dense(t.factors) for t in terms if t.role == role) for role in ("content", "style"))
        columns, rows = dense_principal_cosines(content, style)
        assert overlap.column_cosines.shape == columns.shape
        assert torch.allclose(overlap.column_cosines.double(), columns.clamp(0, 1), atol=atol), key
        if key == "deficient":  # content's up has rank 3, so its delta's rows span 3 of its 4 down rows
            assert torch.allclose(columns, torch.tensor([1.0, 1.0, 0.0], dtype=F64), atol=1e-10)
            continue
        assert overlap.row_cosines.shape == rows.shape
        assert torch.allclose(overlap.row_cosines.double(), rows.clamp(0, 1), atol=atol), key
    assert overlap_summary(merged)[0] == "4 layers: 3 concatenated, 1 single adapter"


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
    # content rows of rank 2 (a repeated down row): only those 2 directions leave the style part
    deficient = LowRank(content.up, torch.cat([content.down[:2], content.down[:1]], 0))
    merged = merge_layer([Term(deficient, 1.0, "content"), Term(style, 2.0, "style")],
                         interference="style without content directions", dtype=F64)
    u, s, _ = torch.linalg.svd(deficient.down.T, full_matrices=False)
    rows = u[:, :2]
    assert s[2] < 1e-12 * s[0]
    expected = dense(deficient) + 2.0 * dense(style) @ (torch.eye(12, dtype=F64) - rows @ rows.T)
    assert torch.allclose(merged.factors.delta(F64), expected, atol=1e-10)
    with pytest.raises(ValueError, match="interference must be one of"):
        merge_layer([Term(content, 1.0, "content")], interference="some")


@pytest.mark.parametrize("shape", [(48, 32), (48, 32, 1, 1), (16, 8, 3, 3)])
def test_qr_factorisation(shape):
    weight = rand(*shape, seed=60)
    f = qr_factorise(weight, 6, svd="exact")
    matrix = weight.reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    assert torch.allclose(f.q @ f.r, (u[:, :6] * s[:6]) @ vh[:6], atol=1e-10)
    assert torch.allclose(f.q.T @ f.q, torch.eye(6, dtype=F64), atol=1e-12)
    assert torch.count_nonzero(torch.tril(f.r, -1)) == 0 and (torch.diagonal(f.r) >= 0).all()
    assert torch.allclose(f.residual + f.q @ f.r, matrix, atol=1e-12)
    assert f.fit_error == pytest.approx(float(torch.linalg.matrix_norm(matrix - f.q @ f.r) / torch.linalg.matrix_norm(matrix)))
    again = qr_factorise(weight.clone(), 6, svd="exact")
    assert torch.equal(f.q, again.q), "Q must be deterministic"


def exact_top_r_error(matrix: torch.Tensor, rank: int) -> float:
    """The smallest ||W - W_r||_F / ||W||_F over rank-r W_r (Eckart-Young), from the full SVD."""
    s = torch.linalg.svdvals(matrix.reshape(matrix.shape[0], -1).double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.parametrize("shape", [(200, 150), (150, 200), (96, 32, 3, 3)])
def test_randomized_factorisation_is_exact_on_rank_r_weights(shape):
    out_dim, in_dim = shape[0], int(torch.tensor(shape[1:]).prod())
    weight = (rand(out_dim, 12, seed=61) @ rand(12, in_dim, seed=62)).reshape(shape)
    fast, exact = qr_factorise(weight, 12), qr_factorise(weight, 12, svd="exact")
    assert fast.fit_error < 1e-12 and exact_top_r_error(weight, 12) < 1e-12
    assert torch.allclose(fast.q, exact.q, atol=1e-9) and torch.allclose(fast.r, exact.r, atol=1e-9)
    assert torch.count_nonzero(torch.tril(fast.r, -1)) == 0 and (torch.diagonal(fast.r) >= 0).all()
    assert torch.equal(qr_factorise(weight.clone(), 12).q, fast.q), "one fixed sketch: Q is deterministic"


def decaying(out_dim: int, in_dim: int, values: torch.Tensor, seed: int) -> torch.Tensor:
    u, _ = torch.linalg.qr(rand(out_dim, len(values), seed=seed))
    v, _ = torch.linalg.qr(rand(in_dim, len(values), seed=seed + 1))
    return (u * values) @ v.T


# measured excess over the exact top-r error, with room. Without oversampling, fast-decaying spectra with small
# gaps σ_r/σ_(r+1) lose most in relative terms (0.9^i: 0.128% of ||W|| missed instead of 0.118%).
@pytest.mark.parametrize("name, weight, rank, tolerance", [
    ("gaussian 200x150", rand(200, 150, seed=63), 16, 0.04),
    ("gaussian 320x768", rand(320, 768, seed=64), 64, 0.07),
    ("1/i spectrum", decaying(320, 320, 1.0 / torch.arange(1, 321, dtype=F64), seed=65), 64, 0.05),
    ("0.9^i spectrum", decaying(320, 320, 0.9 ** torch.arange(1, 321, dtype=F64), seed=66), 64, 0.15),
])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_randomized_fit_error_is_reported_and_near_the_exact_top_r_error(name, weight, rank, tolerance, dtype):
    f = qr_factorise(weight.to(dtype), rank)
    matrix = weight.to(dtype).double()
    dense_error = float(torch.linalg.matrix_norm(matrix - f.q.double() @ f.r.double()) / torch.linalg.matrix_norm(matrix))
    assert f.fit_error == pytest.approx(dense_error, rel=1e-4, abs=1e-6), "the reported error is the real one"
    optimum = exact_top_r_error(weight, rank)
    # float32 resolves the subspace down to about sqrt(eps)·σ_1: a few 1e-5 of ||W|| more error at most
    slack = 1e-6 if dtype == F64 else 3e-5
    assert optimum <= f.fit_error * (1 + 1e-6) <= optimum * (1 + tolerance) + slack, name
    assert torch.allclose(f.q.T @ f.q, torch.eye(rank, dtype=dtype), atol=1e-5 if dtype == torch.float32 else 1e-12)


def test_qr_factorisation_of_half_precision_weights_runs_in_float32():
    weight = rand(32, 16, seed=61).to(torch.float16)
    f = qr_factorise(weight, 4)
    assert f.q.dtype == torch.float32
    with pytest.raises(ValueError, match="rank must be between 1 and 16"):
        qr_factorise(weight, 17)
    with pytest.raises(ValueError, match="svd must be one of"):
        qr_factorise(weight, 4, svd="full")


def test_conversion_to_qr_lora_keeps_span_and_reports_the_rest():
    weight = rand(24, 16, seed=70)
    f = qr_factorise(weight, 5)
    inside = f.q @ rand(5, 16, seed=71)
    converted = convert_to_qr_lora(weight, inside, 5)
    assert converted.fit_error == f.fit_error
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


def test_overlap_report_in_fewer_spaces_gives_the_same_cosines_and_the_same_merge():
    terms = {"a": [Term(lora(30, 20, 3, seed=110), 0.7, "content"), Term(lora(30, 20, 2, seed=111), 1.2, "style")],
             "b": [Term(lora(16, 40, 2, seed=112), 1.0, "content"), Term(lora(16, 40, 4, seed=113), 0.5, "style")]}
    both, output, off = (merge_layers(terms, dtype=F64, overlap=spaces)
                         for spaces in (OVERLAP_BOTH, OVERLAP_OUTPUT, OVERLAP_OFF))
    for key in terms:
        assert torch.equal(output[key].overlap.column_cosines, both[key].overlap.column_cosines)
        assert output[key].overlap.row_cosines is None and both[key].overlap.row_cosines is not None
        assert off[key].overlap == output[key].overlap.__class__(None, None)
        for other in (output, off):
            assert torch.equal(other[key].factors.up, both[key].factors.up)
            assert torch.equal(other[key].factors.down, both[key].factors.down)
    assert "out max" in overlap_summary(output)[1] and "in max" not in overlap_summary(output)[1]
    assert overlap_summary(off)[1] == "a: concatenated"
    with pytest.raises(ValueError, match="overlap report must be one of"):
        merge_layers(terms, overlap="inputs")
