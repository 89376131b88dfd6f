import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from softalign.rl.samplers import (
    ddim_step_mean_std,
    ddim_step_with_logprob,
    flow_sde_step_with_logprob,
    gaussian_kl,
    gaussian_log_prob,
)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_at_eta_zero_matches_the_scheduler(prediction_type):
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in scheduler.timesteps[[0, 4, 9]]:
        expected = scheduler.step(output, t, sample, eta=0.0).prev_sample
        ours, _ = ddim_step_with_logprob(scheduler, output, t, sample, eta=1e-12)  # eta -> 0: the mean
        assert torch.allclose(ours, expected, atol=1e-5), int(t)


def test_ddim_log_prob_is_the_gaussian_density_of_the_drawn_step():
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False
    )
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    sample, output = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = scheduler.timesteps[3]
    prev, log_prob = ddim_step_with_logprob(
        scheduler, output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(1)
    )
    # hand-computed std: eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    a_t = scheduler.alphas_cumprod[int(t)].item()
    a_prev = scheduler.alphas_cumprod[int(t) - 100].item()
    std = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (sample - math.sqrt(1 - a_t) * output) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * output
    reference = torch.distributions.Normal(mean, std).log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(log_prob, reference, atol=1e-4)
    # scoring the same prev_sample again gives the same log-prob; the draw has the stated spread
    _, again = ddim_step_with_logprob(scheduler, output, t, sample, eta=1.0, prev_sample=prev)
    assert torch.allclose(again, log_prob)
    assert ((prev - mean).std() / std) == pytest.approx(1.0, abs=0.35)


def _flow_schedule(kind: str):
    """A flow scheduler set for 8 steps and a (sample, velocity) pair: SD3's layout with shift 1, or FLUX.1's packed
    latents on its resolution-shifted schedule, set as `FluxPipeline` sets it (through the family's backbone)."""
    torch.manual_seed(0)
    if kind == "unshifted":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(8)
        return scheduler, torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    from softalign.families import backbone_for
    from softalign.testing import tiny_pipeline

    pipe = tiny_pipeline("flux")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sample, velocity = torch.randn(2, 1024, 16), torch.randn(2, 1024, 16)  # a 64 x 64 latent grid, packed
    backbone_for(pipe).set_sampling_timesteps(scheduler, 8, "cpu", sample)
    assert scheduler.sigmas[1] > 0.875 + 1e-3  # shifted towards noise: the unshifted second level is 7 / 8
    return scheduler, sample, velocity


@pytest.mark.parametrize("schedule", ["unshifted", "flux"])
def test_flow_sde_step_reduces_to_euler_without_noise_and_scores_its_draw(schedule):
    scheduler, sample, velocity = _flow_schedule(schedule)
    for index in (1, 4):
        scheduler._step_index = index
        euler = scheduler.step(velocity, scheduler.timesteps[index], sample).prev_sample
        ours, _ = flow_sde_step_with_logprob(scheduler, velocity, index, sample, noise_level=1e-12)
        assert torch.allclose(ours, euler, atol=1e-5)
    prev, log_prob = flow_sde_step_with_logprob(
        scheduler, velocity, 3, sample, noise_level=0.7, generator=torch.Generator().manual_seed(2)
    )
    sigma, sigma_next = scheduler.sigmas[3].item(), scheduler.sigmas[4].item()
    dt = sigma_next - sigma
    std_t = 0.7 * math.sqrt(sigma / (1 - sigma))
    mean = sample * (1 + std_t**2 / (2 * sigma) * dt) + velocity * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    density = torch.distributions.Normal(mean, std_t * math.sqrt(-dt)).log_prob(prev)
    assert torch.allclose(log_prob, density.mean(dim=tuple(range(1, density.dim()))), atol=1e-4)
    assert ((prev - mean).std() / (std_t * math.sqrt(-dt))) == pytest.approx(1.0, abs=0.05)  # it draws what it scores


def test_gaussian_log_prob_matches_torch_distributions():
    x, m, s = torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.1
    assert torch.allclose(gaussian_log_prob(x, m, s), torch.distributions.Normal(m, s).log_prob(x).mean(1))


def test_gaussian_kl_by_hand_and_against_torch_distributions():
    mean, reference = torch.tensor([[1.0, 3.0], [0.5, 0.5]]), torch.tensor([[0.0, 0.0], [0.5, 0.5]])
    std = torch.tensor([[2.0], [0.0]])  # one std per sample; the second step is deterministic
    # row 0: ((1 - 0)^2 + (3 - 0)^2) / (2 * 2^2) / 2 dims = 0.625; row 1: no noise -> 0
    assert torch.allclose(gaussian_kl(mean, reference, std), torch.tensor([0.625, 0.0]))
    m, r, s = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.rand(3, 1, 1, 1) + 0.1
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m, s), torch.distributions.Normal(r, s))
    assert torch.allclose(gaussian_kl(m, r, s), expected.mean(dim=(1, 2, 3)), atol=1e-6)


def test_step_mean_std_is_the_gaussian_the_step_draws_from():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    sample, output = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    mean, std = ddim_step_mean_std(scheduler, output, 500, sample, eta=1.0)
    prev, _ = ddim_step_with_logprob(
        scheduler, output, 500, sample, eta=1.0, generator=torch.Generator().manual_seed(3)
    )
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(3))
    assert std.shape == (2, 1, 1, 1) and torch.allclose(prev, mean + std * noise, atol=1e-6)
