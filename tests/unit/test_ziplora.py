"""ZipLoRA (core/ziplora.py) against dense float64 references: the merged change, the loss and its gradient, and a
merge of a LoRA with itself that learns to reproduce it."""
from __future__ import annotations

import pytest
import torch

from core.adapter import LowRank
from core.training import Optimiser, Phase, Recipe
from core.ziplora import (COSINE, DOT, MEAN_PRODUCT, MERGED, new_layer, parameters, penalty, scaled, train_ziplora,
                          ziplora_loss)


def factors(out: int, inner: int, rank: int, seed: int, kernel=()) -> LowRank:
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(out, rank, *([1] * len(kernel)), generator=generator, dtype=torch.float64)
    down = torch.randn(rank, inner, *kernel, generator=generator, dtype=torch.float64) / inner
    return LowRank(up=up, down=down, alpha=None)


def dense(f: LowRank) -> torch.Tensor:
    return f.up.flatten(1) @ f.down.flatten(1)


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_merged_change_is_each_delta_times_its_column_vector(kernel):
    content, style = factors(5, 4, 2, seed=1, kernel=kernel), factors(5, 4, 3, seed=2, kernel=kernel)
    layer = new_layer(content, style)
    with torch.no_grad():
        layer.m_content.copy_(torch.linspace(0.2, 1.8, layer.m_content.numel()))
        layer.m_style.copy_(torch.linspace(1.5, -0.5, layer.m_style.numel()))
    merged = layer.merged()
    assert merged.rank == 5 and merged.up.shape[2:] == content.up.shape[2:] and merged.down.shape[1:] == content.down.shape[1:]
    expected = dense(content) * layer.m_content.double()[None, :] + dense(style) * layer.m_style.double()[None, :]
    assert torch.allclose(dense(merged), expected, atol=1e-12)


def test_alpha_and_strength_fold_into_up():
    f = LowRank(up=torch.randn(3, 2, dtype=torch.float64), down=torch.randn(2, 4, dtype=torch.float64), alpha=1.0)
    assert torch.allclose(dense(scaled(f, 0.6)), f.delta(torch.float64) * 0.6)


def test_penalties_on_known_vectors_and_the_cosine_flat_start():
    layer = new_layer(factors(2, 3, 1, seed=3), factors(2, 3, 1, seed=4))
    with torch.no_grad():
        layer.m_content.copy_(torch.tensor([1.0, -2.0, 0.0]))
        layer.m_style.copy_(torch.tensor([3.0, 1.0, 5.0]))
    layers = {"a": layer, "only content": new_layer(factors(2, 3, 1, seed=5), None)}
    assert penalty(layers, MEAN_PRODUCT).item() == pytest.approx(5 / 3)
    assert penalty(layers, DOT).item() == pytest.approx(1.0)
    assert penalty(layers, COSINE).item() == pytest.approx(1 / (5 ** 0.5 * 35 ** 0.5))
    start = new_layer(factors(2, 3, 1, seed=3), factors(2, 3, 1, seed=4))
    penalty({"a": start}, COSINE).backward()
    assert start.m_content.grad.abs().max() < 1e-6, "parallel vectors: the cosine does not move them"
    with pytest.raises(ValueError, match="penalty must be one of"):
        penalty(layers, "l2")


def toy_predict(base: torch.Tensor, layers: dict, deltas: dict):
    """x̂0 = (W + ΔW) x / (1 + σ²) over channels, with ΔW the merged layer or one LoRA alone (dense)."""
    def predict(which, noisy, sigma, conds):
        delta = layers["w"].up.flatten(1) @ layers["w"].down.flatten(1) if which == MERGED else deltas[which]
        return torch.einsum("oc,bchw->bohw", base + delta, noisy) / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)
    return predict


def test_loss_and_gradient_equal_a_dense_reference():
    content, style = factors(4, 4, 2, seed=6), factors(4, 4, 2, seed=7)
    layers = {"w": new_layer(content, style)}
    with torch.no_grad():
        layers["w"].m_content.copy_(torch.tensor([0.9, 1.1, 0.5, 1.3]))
        layers["w"].m_style.copy_(torch.tensor([1.2, 0.7, 1.0, 0.4]))
    base = torch.eye(4, dtype=torch.float64) * 0.5
    deltas = {"content": dense(content), "style": dense(style)}
    generator = torch.Generator().manual_seed(8)
    x_c, x_s, noise = (torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([0.7, 2.0], dtype=torch.float64)
    loss = ziplora_loss(toy_predict(base, layers, deltas), x_c, x_s, noise, sigma, [None] * 2, [None] * 2, layers,
                        "epsilon", MEAN_PRODUCT, 0.01)
    loss.backward()

    m_c = layers["w"].m_content.detach().double().clone().requires_grad_()
    m_s = layers["w"].m_style.detach().double().clone().requires_grad_()
    merged = deltas["content"] * m_c[None, :] + deltas["style"] * m_s[None, :]
    s = sigma.reshape(-1, 1, 1, 1)

    def eps(delta, x):
        noisy = x + s * noise
        return (noisy - torch.einsum("oc,bchw->bohw", base + delta, noisy) / (1 + s ** 2)) / s
    reference = ((eps(merged, x_c) - eps(deltas["content"], x_c)) ** 2).mean() \
        + ((eps(merged, x_s) - eps(deltas["style"], x_s)) ** 2).mean() + 0.01 * (m_c * m_s).abs().mean()
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(layers["w"].m_content.grad.double(), m_c.grad, rtol=1e-5, atol=1e-9)
    assert torch.allclose(layers["w"].m_style.grad.double(), m_s.grad, rtol=1e-5, atol=1e-9)


def test_a_lora_merged_with_itself_at_weight_zero_reproduces_it():
    lora = factors(4, 4, 2, seed=9)
    lora = LowRank(up=lora.up.float(), down=lora.down.float(), alpha=None)
    layers = {"w": new_layer(lora, lora)}
    base = torch.eye(4) * 0.5
    deltas = {"content": dense(lora), "style": dense(lora)}
    generator = torch.Generator().manual_seed(10)
    data = (torch.randn(6, 4, 3, 3, generator=generator), [None] * 6)
    recipe = Recipe((Phase(300, "epsilon", 0.01),), batch_size=2, seed=1, optimiser=Optimiser(weight_decay=0.0))
    sigmas = torch.linspace(0.1, 3.0, 20)
    start = (dense(layers["w"].merged()) - deltas["content"]).norm() / deltas["content"].norm()
    state = train_ziplora(toy_predict(base, layers, deltas), data, data, sigmas, layers, recipe, MEAN_PRODUCT, 0.0)
    error = (dense(layers["w"].merged()) - deltas["content"]).norm() / deltas["content"].norm()
    assert start == pytest.approx(1.0) and error < 0.02, (start, error)
    assert len(state.losses) == 300 and state.losses[-1] < 0.01 * state.losses[0]
    assert sorted(parameters(layers)) == ["w.m_content", "w.m_style"]
