"""Property-based tests (hypothesis) for the layout parser, the merge and QR math, masks, and a bounded fuzz
run of the safetensors reader. Every property is checked against an independent dense computation."""
from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.adapter import LowRank
from core.adapter_file import AdapterFileError, read_safetensors, write_safetensors
from core.formats import adapter_from_tensors, tensors_from_modules
from core.layouts import LAYOUTS, LORA_SUFFIXES, QR_SUFFIXES, split_key
from core.localized import binarize
from core.merge import Term, merge_layers
from core.qr_lora import qr_factorise

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=8)
PREFIXES = ["lora_unet_", "lora_te1_", "diffusion_model.", "text_encoders.", "input_blocks.", "unet.", "unet.unet.",
            "base_model.model.", "up_blocks.", "text_encoder.", ""]


@PROPERTY
@given(prefix=st.sampled_from(PREFIXES), parts=st.lists(segment, min_size=1, max_size=5),
       suffix=st.sampled_from(sorted({**LORA_SUFFIXES, **QR_SUFFIXES})))
def test_every_factor_key_splits_back_into_its_module_and_part(prefix, parts, suffix):
    module = prefix + ".".join(parts)
    found = split_key(module + suffix)
    assert found is not None
    layout, got_module, part = found
    matched = (module + suffix)[len(got_module):]
    assert layout in LAYOUTS and matched in layout.suffixes and layout.suffixes[matched] == part
    # the longest suffix wins: the module the file meant, or a shorter one only when the suffix itself nests
    assert got_module == module or (module + suffix).endswith(matched) and len(matched) > len(suffix)


def lowranks(out_dim, in_dim, rank, seed, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return LowRank(up=torch.randn(out_dim, rank, generator=g, dtype=torch.float64),
                   down=torch.randn(rank, in_dim, generator=g, dtype=torch.float64), alpha=alpha)


@PROPERTY
@given(out_dim=st.integers(1, 12), in_dim=st.integers(1, 12), ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       weights=st.lists(st.floats(-3, 3, allow_nan=False), min_size=4, max_size=4), seed=st.integers(0, 10_000))
def test_merge_equals_the_weighted_sum(out_dim, in_dim, ranks, weights, seed):
    terms = [Term(lowranks(out_dim, in_dim, r, seed + i, alpha=float(r) * 0.5), weights[i], ("content", "style")[i % 2])
             for i, r in enumerate(ranks)]
    merged = merge_layers({"w": terms}, "off", dtype=torch.float64)["w"].factors.delta(torch.float64)
    expected = sum(t.weight * t.factors.delta(torch.float64) for t in terms)
    assert torch.allclose(merged, expected, atol=1e-9 * (1 + expected.abs().max()))


@PROPERTY
@given(out_dim=st.integers(2, 16), in_dim=st.integers(2, 16), seed=st.integers(0, 10_000), data=st.data())
def test_qr_factorisation_is_orthonormal_triangular_and_exact(out_dim, in_dim, seed, data):
    rank = data.draw(st.integers(1, min(out_dim, in_dim)))
    weight = torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = qr_factorise(weight, rank)
    assert torch.allclose(f.q.T @ f.q, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    assert torch.equal(f.r, torch.triu(f.r)) and bool((torch.diagonal(f.r) >= 0).all())
    assert torch.allclose(f.residual + f.q @ f.r, weight, atol=1e-10)


@PROPERTY
@given(batch=st.integers(1, 3), n=st.integers(2, 40), seed=st.integers(0, 10_000), percent=st.floats(0, 100))
def test_masks_are_binary_and_select_what_they_say(batch, n, seed, percent):
    attention = torch.rand(batch, n, generator=torch.Generator().manual_seed(seed))
    for mode, value in (("median", 0.0), ("fixed value", 0.5), ("top-k percent", percent)):
        mask = binarize(attention, mode, value)
        assert mask.shape == attention.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
    top = binarize(attention, "top-k percent", percent)
    assert (top.sum(1) == round(n * percent / 100)).all()
    for row in range(batch):  # every chosen position has at least the attention of every position left out
        chosen, left = attention[row][top[row].bool()], attention[row][~top[row].bool()]
        if chosen.numel() and left.numel():
            assert chosen.min() >= left.max()
    median = binarize(attention, "median", 0.0)
    assert torch.equal(median.bool(), attention > attention.median(dim=1, keepdim=True).values)


@PROPERTY
@given(out_dim=st.integers(1, 8), in_dim=st.integers(1, 8), rank=st.integers(1, 4), seed=st.integers(0, 1000),
       alpha=st.one_of(st.none(), st.floats(0.5, 8)))
def test_written_factors_read_back_identically(out_dim, in_dim, rank, seed, alpha):
    factors = lowranks(out_dim, in_dim, rank, seed, alpha)
    tensors = tensors_from_modules({"lora_unet_a_b": factors}, {"lora_unet_a_b": "lora_unet_a_b"})
    back = adapter_from_tensors(tensors, {}).modules["lora_unet_a_b"]
    assert torch.equal(back.up, factors.up) and torch.equal(back.down, factors.down)
    assert back.alpha == (None if alpha is None else pytest.approx(alpha))


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    factors = lowranks(4, 3, 2, 0)
    write_safetensors(path, tensors_from_modules({"lora_unet_x": factors}, {"lora_unet_x": "lora_unet_x"}),
                      {"csa.role": "style"})
    return path.read_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_read_or_fail_with_a_file_error(valid_file, tmp_path, data):
    """Bounded fuzz: truncations, byte flips, header-length lies and junk headers either read as valid
    safetensors or raise AdapterFileError naming the file; nothing else escapes."""
    blob = bytearray(valid_file)
    action = data.draw(st.sampled_from(["truncate", "flip", "header_length", "junk_header"]))
    if action == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif action == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    elif action == "header_length":
        blob[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**40)))
    else:
        junk = data.draw(st.binary(max_size=64))
        blob = bytearray(struct.pack("<Q", len(junk)) + junk + blob[8:])
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(bytes(blob))
    try:
        tensors, _ = read_safetensors(path)
    except AdapterFileError as error:
        assert "fuzzed.safetensors" in str(error)
    else:
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
