"""core.b4m and the engine features B4M needs: frozen halves, seeds, make, preconditioning, routed loss terms."""
import pytest
import torch

from core.b4m import frozen_halves, frozen_masks, layer_generator, make, plp_lora, precondition_all, preconditioned
from core.training import Optimiser, Phase, Recipe, SecondSet, grouped_names, optimise, train_diffusion


def test_plp_init_square_layers_get_orthonormal_frozen_halves_from_the_seed():
    factors = plp_lora((64, 64), 8, seed=3, name="a.to_q")
    up_frozen, down_frozen = frozen_halves(factors)
    assert up_frozen.shape == (32, 8) and down_frozen.shape == (8, 32)
    # rows of one orthonormal basis: disjoint subsets, so together they are orthonormal-ish columns of a sub-basis
    stacked = torch.cat([down_frozen.T, up_frozen])
    assert torch.linalg.matrix_rank(stacked) == 8 and stacked.abs().max() < 1
    assert not factors.up[32:].abs().sum() and factors.scale == 1.0
    again, other_seed = plp_lora((64, 64), 8, 3, "a.to_q"), plp_lora((64, 64), 8, 4, "a.to_q")
    assert torch.equal(again.up, factors.up) and torch.equal(again.down, factors.down)
    assert not torch.equal(other_seed.down, factors.down)
    assert not torch.equal(plp_lora((64, 64), 8, 3, "b.to_q").down, factors.down)  # each layer its own draw
    wide = plp_lora((32, 48), 8, 3, "a.to_k")  # not square: usual init, up all zero
    assert not wide.up.abs().sum() and torch.allclose(wide.down.std(), torch.tensor(1 / 8), rtol=0.2)
    conv = plp_lora((64, 64, 1, 1), 8, 3, "a.to_q")  # a 1x1 conv is the same map: the same draw, kernel dims added
    assert conv.up.shape == (64, 8, 1, 1) and conv.down.shape == (8, 64, 1, 1)
    assert torch.equal(conv.up.flatten(1), factors.up) and torch.equal(conv.down.flatten(1), factors.down)
    up_mask, down_mask = frozen_masks((64, 64, 1, 1), 8)
    assert up_mask.shape == conv.up.shape and down_mask.shape == conv.down.shape
    assert not up_mask[:32].any() and up_mask[32:].all() and not down_mask[:, :32].any() and down_mask[:, 32:].all()
    with pytest.raises(ValueError, match="1x1 convs; conv has a weight of shape"):
        plp_lora((32, 32, 3, 3), 8, 3, "conv")


def test_non_square_option_gives_non_square_layers_frozen_halves_from_one_basis_and_leaves_square_ones_alone():
    square, official = plp_lora((64, 64), 8, 3, "a.to_q", non_square=True), plp_lora((64, 64), 8, 3, "a.to_q")
    assert torch.equal(square.up, official.up) and torch.equal(square.down, official.down)
    wide = plp_lora((32, 48), 8, 3, "a.to_k", non_square=True)
    up_frozen, down_frozen = frozen_halves(wide)
    assert up_frozen.shape == (16, 8) and down_frozen.shape == (8, 24)
    assert up_frozen.abs().min() > 0 and not wide.up[16:].abs().sum()  # up's frozen half is no longer zero
    # the frozen halves are disjoint rows of one orthonormal basis: QᵀQ = I summed over all rows, so the Gram matrix
    # of any subset of rows lies between 0 and I, and it is I only for all of them
    gram = torch.cat([down_frozen.T, up_frozen]).double()
    eigenvalues = torch.linalg.eigvalsh(gram.T @ gram)
    assert eigenvalues.min() > 0 and eigenvalues.max() < 1 + 1e-6
    # an independent re-draw of the definition: the layer's generator, down's N(0, 1/r²), the basis, one permutation
    generator = layer_generator(3, "a.to_k")
    down = torch.randn(8, 48, generator=generator) / 8
    basis = torch.linalg.qr(torch.randn(1280, 8, generator=generator, dtype=torch.float64))[0].float()
    order = torch.randperm(1280, generator=generator)
    assert torch.equal(wide.down[:, 24:], down[:, 24:]) and torch.equal(down_frozen, basis[order[:24]].T)
    assert torch.equal(up_frozen, basis[order[24:40]])
    with pytest.raises(ValueError, match=r"one seed and one init \(orthogonal_init, orthogonal_non_square\)"):
        make({"m": plp_lora((32, 48), 8, 3, "m", non_square=True)}, {"m": plp_lora((32, 48), 8, 3, "m")})


def test_training_through_masks_keeps_frozen_halves_bit_identical_even_with_weight_decay():
    factors = plp_lora((16, 16), 4, 0, "m")
    up, down = factors.up.clone().requires_grad_(), factors.down.clone().requires_grad_()
    up_mask, down_mask = frozen_masks((16, 16), 4)
    target = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    before = [t.detach().clone() for t in frozen_halves(factors)]
    optimise({"up": up, "down": down}, lambda s, m: ((up @ down - target) ** 2).mean(), 20, lambda s: 1e-2,
             Optimiser(weight_decay=0.1), grad_masks={"up": up_mask, "down": down_mask})
    after = frozen_halves(type(factors)(up=up.detach(), down=down.detach()))
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not torch.equal(up.detach()[8:], factors.up[8:]) and not torch.equal(down.detach()[:, 8:], factors.down[:, 8:])


def test_make_equals_its_definition_and_refuses_other_seeds():
    content = {"m": plp_lora((16, 16), 4, 5, "m")}
    style = {"m": plp_lora((16, 16), 4, 5, "m")}
    generator = torch.Generator().manual_seed(0)
    content["m"].down[:, 8:] = torch.randn(4, 8, generator=generator)  # what the runs train
    content["m"].up[8:] = torch.randn(8, 4, generator=generator)
    style["m"].down[:, 8:] = torch.randn(4, 8, generator=generator)
    style["m"].up[8:] = torch.randn(8, 4, generator=generator)
    made = make(content, style)["m"]
    assert torch.equal(made.up, style["m"].up)
    assert torch.equal(made.down[:, :8], style["m"].down[:, :8]) and torch.equal(made.down[:, 8:], content["m"].down[:, 8:])
    expected = style["m"].up @ torch.cat([style["m"].down[:, :8], content["m"].down[:, 8:]], 1)
    assert torch.equal(made.delta(), expected)
    with pytest.raises(ValueError, match=r"content run \(seed 5\) and the style run \(seed 6\) have different frozen"):
        make(content, {"m": plp_lora((16, 16), 4, 6, "m")}, "5", "6")
    with pytest.raises(ValueError, match="adapt different layers"):
        make(content, {"n": style["m"]})


@pytest.mark.parametrize("shape", [((12, 4), (4, 10)), ((12, 4, 1, 1), (4, 10, 1, 1))])
def test_preconditioned_gradient_equals_a_float64_dense_reference(shape):
    generator = torch.Generator().manual_seed(2)
    up, down = torch.randn(*shape[0], generator=generator), torch.randn(*shape[1], generator=generator)
    grad_up, grad_down = torch.randn(*shape[0], generator=generator), torch.randn(*shape[1], generator=generator)
    reg = 0.05
    new_up, new_down = preconditioned(grad_up, grad_down, up, down, reg)
    u, d = up.double().flatten(1), down.double().flatten(1)
    eye = torch.eye(4, dtype=torch.float64)
    ref_up = grad_up.double().flatten(1) @ torch.linalg.inv(d @ d.T + reg * eye)
    ref_down = torch.linalg.inv(u.T @ u + reg * eye) @ grad_down.double().flatten(1)
    assert new_up.shape == grad_up.shape and new_down.shape == grad_down.shape
    assert torch.allclose(new_up.flatten(1).double(), ref_up, rtol=1e-4, atol=1e-5)
    assert torch.allclose(new_down.flatten(1).double(), ref_down, rtol=1e-4, atol=1e-5)
    zero_up = torch.zeros(*shape[0])  # a factor still at zero leaves the other gradient alone (as AdamWr does)
    assert torch.equal(preconditioned(grad_up, grad_down, zero_up, down, 0.0)[1], grad_down)
    a, b = up.clone().requires_grad_(), down.clone().requires_grad_()
    a.grad, b.grad = grad_up.clone(), grad_down.clone()
    precondition_all([(a, b)], reg)
    assert torch.equal(a.grad, new_up) and torch.equal(b.grad, new_down)


def test_routed_terms_train_only_their_parameters_at_their_rates():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    a, b = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    def terms(step, micro):
        return (((x @ (a + b) - 1) ** 2).mean(), ("a",)), (((x @ (a + b) + 1) ** 2).mean(), ("b",))
    optimise({"a": a, "b": b}, terms, 1, lambda s: 0.1, Optimiser(weight_decay=0.0), lr_scales={"b": 0.1})
    # one Adam step moves each entry by about lr · sign(gradient): a toward +1 at 0.1, b toward -1 at 0.01
    assert torch.allclose(a.detach().abs(), torch.full((5,), 0.1), rtol=1e-3)
    assert torch.allclose(b.detach().abs(), torch.full((5,), 0.01), rtol=1e-3)
    assert grouped_names(["a", "b", "c"], {"b": 0.1}) == ["a", "c", "b"]


def test_second_set_shares_noise_and_noise_level_with_the_main_batch():
    seen = []

    def predict(noisy, sigma, conds):
        seen.append((noisy.detach().clone(), sigma.clone(), list(conds)))
        return noisy * weight

    weight = torch.ones(1, requires_grad=True)
    main, other = torch.zeros(3, 2, 2, 2), torch.ones(2, 2, 2, 2)
    recipe = Recipe((Phase(2, "epsilon", 1e-3),), batch_size=2, seed=0)
    state = train_diffusion(predict, main, ["m0", "m1", "m2"], torch.tensor([0.5, 1.0, 2.0]), {"w": weight}, recipe,
                            second=SecondSet(other, ["o0", "o1"]))
    noisy, sigma, conds = seen[0]
    assert sigma.shape == (4,) and torch.equal(sigma[:2], sigma[2:])
    assert torch.allclose(noisy[2:] - 1, noisy[:2])  # same noise: x1 + σε vs x0 + σε with x1 - x0 = 1
    assert [c[0] for c in conds] == ["m", "m", "o", "o"] and len(state.losses) == 2
    with pytest.raises(ValueError, match="train both at one resolution"):
        train_diffusion(predict, main, ["m"] * 3, torch.tensor([1.0]), {"w": weight}, recipe,
                        second=SecondSet(torch.ones(2, 2, 4, 4), ["o", "o"]))
