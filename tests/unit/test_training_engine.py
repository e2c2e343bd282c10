"""core.training: the engine's math against hand formulas (known noise and timestep), the loss switch, schedules,
accumulation, masks, callbacks and an exact resume."""
import math

import pytest
import torch

from core.training import (FLOW, Optimiser, Periodic, Phase, Recipe, TrainState, batch_indices, diffusion_loss,
                           draw_noise, min_snr_weight, noisy_latent, optimise, optimiser_state_from_tensors,
                           optimiser_state_tensors, schedule_factor, seeded, train_diffusion)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def known():
    """A clean latent, a noise draw, two noise levels and a prediction that is off by a known amount."""
    x0, noise = rand(2, 4, 3, 3, seed=1), rand(2, 4, 3, 3, seed=2)
    sigma = torch.tensor([0.5, 3.0])
    x0_hat = x0 + 0.1 * rand(2, 4, 3, 3, seed=3)
    return x0, noise, sigma, x0_hat


def ddpm(sigma):
    """ᾱ of a k-diffusion noise level: x_σ = z_t / √ᾱ with ᾱ = 1 / (1 + σ²)."""
    return 1 / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def test_x0_loss_is_consislora_formula_in_ddpm_terms(known):
    x0, noise, sigma, x0_hat = known
    abar = ddpm(sigma)
    z_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # DDPM's noisy latent
    eps_hat = (x0 + sigma.reshape(-1, 1, 1, 1) * noise - x0_hat) / sigma.reshape(-1, 1, 1, 1)
    x0_hat_ddpm = (z_t - (1 - abar).sqrt() * eps_hat) / abar.sqrt()  # ConsisLoRA: x̂0 = (z_t − √(1−ᾱ) ε̂) / √ᾱ
    assert torch.allclose(x0_hat_ddpm, x0_hat, atol=1e-5)
    expected = ((x0 - x0_hat_ddpm) ** 2).flatten(1).mean(1).mean()
    assert torch.allclose(diffusion_loss(x0, noise, sigma, x0_hat, "x0"), expected, atol=1e-6)
    per_sample_eps = ((noise - eps_hat) ** 2).flatten(1).mean(1)  # = ε-MSE · (1 − ᾱ)/ᾱ
    weighted = (per_sample_eps * ((1 - abar) / abar).flatten()).mean()
    assert torch.allclose(diffusion_loss(x0, noise, sigma, x0_hat, "x0"), weighted, atol=1e-6)


def test_epsilon_and_v_losses_by_hand(known):
    x0, noise, sigma, x0_hat = known
    s = sigma.reshape(-1, 1, 1, 1)
    noisy = x0 + s * noise
    eps_hat = (noisy - x0_hat) / s
    assert torch.allclose(diffusion_loss(x0, noise, sigma, x0_hat, "epsilon"),
                          ((eps_hat - noise) ** 2).flatten(1).mean(1).mean(), atol=1e-6)
    abar = ddpm(sigma)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0  # DDPM's v
    v_hat = abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat
    assert torch.allclose(diffusion_loss(x0, noise, sigma, x0_hat, "v"), ((v_hat - v) ** 2).flatten(1).mean(1).mean(),
                          atol=1e-6)
    x0_mse = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(diffusion_loss(x0, noise, sigma, x0_hat, "v"), (x0_mse * (1 + sigma ** 2) / sigma ** 2).mean(),
                          atol=1e-6)
    with pytest.raises(ValueError, match="loss target must be one of"):
        diffusion_loss(x0, noise, sigma, x0_hat, "flow")


def test_min_snr_weighs_every_target_by_min_snr_gamma(known):
    x0, noise, sigma, x0_hat = known
    snr = 1 / sigma ** 2  # 4 and 1/9
    assert torch.allclose(min_snr_weight(sigma, "epsilon", 2.0), torch.tensor([2 / 4, 1.0]))
    assert torch.allclose(min_snr_weight(sigma, "x0", 2.0), torch.tensor([2.0, 1 / 9]))
    assert torch.allclose(min_snr_weight(sigma, "v", 2.0), torch.tensor([2 / 5, (1 / 9) / (1 / 9 + 1)]))
    assert torch.equal(min_snr_weight(sigma, "x0", 0.0), torch.ones(2))
    x0_mse = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    for target in ("epsilon", "x0", "v"):
        assert torch.allclose(diffusion_loss(x0, noise, sigma, x0_hat, target, 2.0),
                              (x0_mse * snr.clamp(max=2.0)).mean(), atol=1e-6), target


def test_noise_offset_adds_one_draw_per_sample_and_channel():
    noise = draw_noise((2, 3, 4, 4), 0.03, seeded(1, 2))
    generator = seeded(1, 2)
    base = torch.randn(2, 3, 4, 4, generator=generator)
    assert torch.equal(noise, base + 0.03 * torch.randn(2, 3, 1, 1, generator=generator))
    assert torch.equal(draw_noise((2, 3, 4, 4), 0.0, seeded(1, 2)), base)


def test_schedules_and_warmup():
    constant, cosine, linear = (Optimiser(schedule=s, warmup_steps=2) for s in ("constant", "cosine", "linear"))
    assert [schedule_factor(constant, k, 10) for k in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert schedule_factor(cosine, 2, 10) == 1.0 and math.isclose(schedule_factor(cosine, 6, 10), 0.5)
    assert math.isclose(schedule_factor(linear, 6, 10), 0.5) and math.isclose(schedule_factor(linear, 9, 10), 0.125)
    with pytest.raises(ValueError, match="schedule must be one of"):
        Optimiser(schedule="step").check()


def test_batches_cover_every_row_once_per_epoch():
    rows = batch_indices(5, 10, seed=3, position=0)
    assert sorted(rows[:5]) == sorted(rows[5:]) == list(range(5)) and rows[:5] != rows[5:]
    assert batch_indices(5, 3, 3, 4) == rows[4:7]


def toy_predict(weight):
    """A one-parameter 'model': x̂0 = w · x_σ."""
    return lambda noisy, sigma, conds: weight * noisy


def hand_run(latents, sigmas, recipe, steps):
    """The engine's loop replicated by hand: its documented draws, the phase's target and lr, Adam's update."""
    w, m, v = torch.tensor(0.5, dtype=torch.float64), 0.0, 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    losses = []
    for step in range(steps):
        phase = recipe.phase_at(step)
        generator = seeded(recipe.seed, 2, step, 0)
        rows = batch_indices(len(latents), recipe.batch_size, recipe.seed, step * recipe.batch_size)
        sigma = sigmas[torch.randint(0, len(sigmas), (len(rows),), generator=generator)]
        noise = draw_noise(tuple(latents[rows].shape), recipe.noise_offset, generator)
        weight = w.clone().float().requires_grad_()
        loss = diffusion_loss(latents[rows], noise, sigma, weight * (latents[rows] + sigma.view(-1, 1, 1, 1) * noise),
                              phase.target)
        loss.backward()
        g = float(weight.grad)
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        w = w - phase.lr * (m / (1 - beta1 ** (step + 1))) / (math.sqrt(v / (1 - beta2 ** (step + 1))) + eps)
        losses.append(float(loss.detach()))
    return losses, float(w)


def test_loss_target_and_learning_rate_switch_at_step_s():
    latents, sigmas = rand(3, 2, 2, 2, seed=4), torch.linspace(0.1, 5.0, 10)
    recipe = Recipe((Phase(3, "epsilon", 0.05), Phase(6, "x0", 0.01)), batch_size=2, seed=7,
                    optimiser=Optimiser(name="adam", weight_decay=0.0))
    weight = torch.tensor(0.5, requires_grad=True)
    state = train_diffusion(toy_predict(weight), latents, [None] * 3, sigmas, {"w": weight}, recipe)
    expected, w = hand_run(latents, sigmas, recipe, 6)
    assert state.step == 6 and torch.allclose(torch.tensor(state.losses), torch.tensor(expected), atol=1e-5)
    assert math.isclose(float(weight.detach()), w, abs_tol=1e-5)
    switched = Recipe((Phase(6, "epsilon", 0.05),), 2, 7, optimiser=recipe.optimiser)
    same_until_s = hand_run(latents, sigmas, switched, 6)[0]
    assert expected[:3] == pytest.approx(same_until_s[:3], abs=1e-6) and expected[3] != pytest.approx(same_until_s[3])


def test_accumulation_averages_micro_batches_and_masks_keep_gradients_out():
    weight = torch.zeros(2, 3, requires_grad=True)
    mask = torch.triu(torch.ones(2, 3))
    calls = []

    def micro_loss(step, micro):
        calls.append((step, micro))
        return ((weight - (micro + 1)) ** 2).sum()

    state = optimise({"w": weight}, micro_loss, 3, lambda step: 0.1, Optimiser(weight_decay=0.1, accumulation=2),
                     grad_masks={"w": mask})
    assert calls == [(s, m) for s in range(3) for m in range(2)]
    assert state.losses[0] == pytest.approx((6 * 1 + 6 * 4) / 2)
    assert torch.equal(weight.detach() * (1 - mask), torch.zeros(2, 3)) and weight.detach()[mask.bool()].abs().min() > 0


def test_callbacks_run_on_schedule_and_a_raising_step_cancels():
    weight = torch.zeros(1, requires_grad=True)
    seen, saved = [], []
    optimise({"w": weight}, lambda s, m: ((weight - 1) ** 2).sum(), 5, lambda s: 0.1, Optimiser(),
             on_step=lambda step, loss: seen.append(step),
             periodic=(Periodic(2, lambda step, state: saved.append((step, state.step, state.optimiser is not None))),))
    assert seen == [0, 1, 2, 3, 4] and saved == [(2, 2, True), (4, 4, True)]

    def cancel(step, loss):
        if step == 1:
            raise KeyboardInterrupt("cancelled")
    with pytest.raises(KeyboardInterrupt):
        optimise({"w": weight}, lambda s, m: ((weight - 1) ** 2).sum(), 5, lambda s: 0.1, Optimiser(), on_step=cancel)


def test_resume_from_saved_optimiser_state_continues_exactly():
    latents, sigmas = rand(4, 2, 2, 2, seed=5), torch.linspace(0.1, 5.0, 10)
    recipe = Recipe((Phase(2, "epsilon", 0.05), Phase(6, "x0", 0.02)), batch_size=3, seed=1, noise_offset=0.1,
                    min_snr_gamma=5.0, optimiser=Optimiser(schedule="cosine", warmup_steps=1, grad_clip=1.0))
    whole = torch.tensor([0.5, 0.2], requires_grad=True)
    straight = train_diffusion(lambda x, s, c: whole[0] * x + whole[1], latents, [None] * 4, sigmas, {"w": whole}, recipe)
    part = torch.tensor([0.5, 0.2], requires_grad=True)
    kept = []
    train_diffusion(lambda x, s, c: part[0] * x + part[1], latents, [None] * 4, sigmas, {"w": part}, recipe,
                    on_step=lambda step, loss: None, periodic=(Periodic(3, lambda step, state: kept.append(
                        (part.detach().clone(), optimiser_state_tensors(state.optimiser, ["w"]), list(state.losses)))),))
    values, (tensors, rest), losses = kept[0]
    resumed = values.clone().requires_grad_()
    state = TrainState(3, losses, optimiser_state_from_tensors(tensors, rest, ["w"]))
    finished = train_diffusion(lambda x, s, c: resumed[0] * x + resumed[1], latents, [None] * 4, sigmas,
                               {"w": resumed}, recipe, state=state)
    assert finished.losses == pytest.approx(straight.losses, abs=1e-6)
    assert torch.allclose(resumed, whole, atol=1e-6)




def test_flow_matching_targets_by_hand(known):
    """FLUX / SD3 (ComfyUI's CONST sampling): x_t = (1 − t) x0 + t ε; the velocity v = ε − x0 and ε from the model's
    x0 prediction, against the formulas written out."""
    x0, noise, _, x0_hat = known
    t = torch.tensor([0.3, 0.9])
    s = t.reshape(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    assert torch.equal(noisy_latent(x0, noise, t, FLOW), x_t)
    v_hat = (x_t - x0_hat) / s  # ComfyUI's CONST: x̂0 = x_t − t v̂
    assert torch.allclose(diffusion_loss(x0, noise, t, x0_hat, "v", noising=FLOW),
                          ((v_hat - (noise - x0)) ** 2).flatten(1).mean(1).mean(), atol=1e-6)
    eps_hat = (x_t - (1 - s) * x0_hat) / s
    assert torch.allclose(diffusion_loss(x0, noise, t, x0_hat, "epsilon", noising=FLOW),
                          ((eps_hat - noise) ** 2).flatten(1).mean(1).mean(), atol=1e-6)
    x0_mse = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    assert torch.allclose(diffusion_loss(x0, noise, t, x0_hat, "v", noising=FLOW), (x0_mse / t ** 2).mean(), atol=1e-6)
    assert torch.allclose(diffusion_loss(x0, noise, t, x0_hat, "x0", noising=FLOW), x0_mse.mean(), atol=1e-7)


def test_flow_min_snr_weighs_every_target_alike(known):
    x0, noise, _, x0_hat = known
    t = torch.tensor([0.05, 0.6])
    snr = ((1 - t) / t) ** 2
    x0_mse = ((x0_hat - x0) ** 2).flatten(1).mean(1)
    expected = (x0_mse * snr.clamp(max=5.0)).mean()
    for target in ("epsilon", "x0", "v"):
        weighted = diffusion_loss(x0, noise, t, x0_hat, target, min_snr_gamma=5.0, noising=FLOW)
        assert torch.allclose(weighted, expected, rtol=1e-5), target
    assert torch.equal(min_snr_weight(t, "v", 0.0, FLOW), torch.ones(2))


def test_a_flow_model_trains_toward_the_velocity():
    """A toy flow model x̂0 = x_t − t · w · x_t learns the w whose velocity fits, with the v loss on the flow path."""
    latents = rand(4, 2, 2, 2, seed=9) * 0.1
    sigmas = torch.linspace(0.05, 1.0, 20)
    weight = torch.tensor(0.0, requires_grad=True)
    recipe = Recipe((Phase(60, "v", 0.05),), batch_size=4, seed=3, optimiser=Optimiser(name="adam", weight_decay=0.0))
    state = train_diffusion(lambda x, t, c: x - t.reshape(-1, 1, 1, 1) * weight * x, latents, [None] * 4, sigmas,
                            {"w": weight}, recipe, noising=FLOW)
    assert state.losses[-1] < 0.5 * state.losses[0] and 0.5 < float(weight) < 1.5  # v ≈ ε ≈ x_t for small x0
