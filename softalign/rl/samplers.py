"""Stochastic sampler steps that also return the log-density of the step taken, for policy-gradient RL.

This is the one file that reproduces scheduler internals; what differs from the originals:

- `ddim_step_with_logprob` follows diffusers' `DDIMScheduler.step` (epsilon / v-prediction / sample, eta-weighted
  variance, optional clipping) and, as DDPO (arXiv 2305.13301) and TRL's `ddim_step_with_logprob`, returns the
  Gaussian log-density of `prev_sample` under `N(mean, std_dev_t^2)`, averaged over all but the batch axis. It
  takes a batch of timesteps and an optional given `prev_sample` (to re-score a stored trajectory).
- `flow_sde_step_with_logprob` turns the rectified-flow ODE step of `FlowMatchEulerDiscreteScheduler` into the SDE of
  Flow-GRPO (arXiv 2505.05470) with the same marginals: `std_dev_t = noise_level * sqrt(sigma / (1 - sigma))`,
  drift corrected by the score implied by the velocity, Gaussian noise of std `std_dev_t * sqrt(-dt)`.
- `*_step_mean_std` expose each step's Gaussian, and `gaussian_kl` the closed-form KL between two policies' steps (the
  KL penalty of `DDPOConfig.kl_coef`, as Flow-GRPO's beta term).
"""

from __future__ import annotations

import math

import torch


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    values = values.to(like.device, like.dtype).reshape(-1)
    if values.numel() == 1:
        values = values.expand(like.shape[0])
    return values.reshape(like.shape[0], *([1] * (like.dim() - 1)))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch axis of `log N(sample; mean, std^2)`."""
    log_prob = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.mean(dim=tuple(range(1, sample.dim())))


def ddim_step_mean_std(
    scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (per sample) of the DDIM step's Gaussian `p(x_{t-1} | x_t)`; see
    `ddim_step_with_logprob` for the arguments."""
    config = scheduler.config
    if scheduler.num_inference_steps is None:
        raise ValueError("Call scheduler.set_timesteps(...) before stepping.")
    timestep = torch.as_tensor(timestep, device=sample.device).long()
    step = config.num_train_timesteps // scheduler.num_inference_steps
    prev_timestep = timestep - step
    alphas = scheduler.alphas_cumprod.to(sample.device)
    alpha_t = _per_sample(alphas[timestep.clamp(0, config.num_train_timesteps - 1)], sample)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, device=sample.device)
    alpha_prev = torch.where(prev_timestep >= 0, alphas[prev_timestep.clamp(min=0)], final)
    alpha_prev = _per_sample(alpha_prev, sample)
    beta_t = 1 - alpha_t

    if config.prediction_type == "epsilon":
        x0 = (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt()
        epsilon = model_output
    elif config.prediction_type == "sample":
        x0 = model_output
        epsilon = (sample - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif config.prediction_type == "v_prediction":
        x0 = alpha_t.sqrt() * sample - beta_t.sqrt() * model_output
        epsilon = alpha_t.sqrt() * model_output + beta_t.sqrt() * sample
    else:
        raise ValueError(f"Unsupported prediction_type {config.prediction_type!r} for the DDIM log-prob step.")
    if config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std_dev_t = eta * variance.sqrt()
    direction = (1 - alpha_prev - std_dev_t**2).clamp(min=0).sqrt() * epsilon
    mean = alpha_prev.sqrt() * x0 + direction
    return mean, std_dev_t


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step `x_t -> x_{t-1}` and its log-probability.

    Args:
        scheduler (`DDIMScheduler`): with `set_timesteps` called (its step size is used).
        model_output (`torch.Tensor`): the denoiser output (epsilon, v or sample, per the scheduler config).
        timestep (`torch.Tensor` or `int`): current timestep(s), scalar or one per sample.
        sample (`torch.Tensor`): `x_t`.
        eta (`float`, *optional*, defaults to 1.0): 0 is the deterministic DDIM step (its log-prob is undefined).
        prev_sample (`torch.Tensor`, *optional*): score this `x_{t-1}` instead of drawing one.
        generator: the noise generator(s) for drawing `x_{t-1}`.

    Returns:
        `(prev_sample, log_prob)` with `log_prob` of shape `(batch,)`.
    """
    mean, std_dev_t = ddim_step_mean_std(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        noise = _randn(model_output.shape, generator, model_output)
        prev_sample = mean + std_dev_t * noise
    # A step onto alpha = 1 (`set_alpha_to_one=True`, last step) has no variance: it is deterministic, carries no
    # policy gradient, and gets log-prob 0 instead of NaN.
    random_rows = (std_dev_t > 0).reshape(-1)
    safe_std = torch.where(std_dev_t > 0, std_dev_t, torch.ones_like(std_dev_t)).expand_as(mean)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, safe_std)
    log_prob = torch.where(random_rows, log_prob, torch.zeros_like(log_prob))
    return prev_sample.to(sample.dtype), log_prob


def flow_sde_step_mean_std(
    scheduler,
    model_output: torch.Tensor,
    step_index: int | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (per sample) of the Flow-GRPO step's Gaussian; see `flow_sde_step_with_logprob`."""
    sigmas = scheduler.sigmas.to(sample.device, torch.float32)
    index = torch.as_tensor(step_index, device=sample.device).long()
    sigma = _per_sample(sigmas[index], sample).float()
    sigma_next = _per_sample(sigmas[index + 1], sample).float()
    sigma_max = sigmas[1] if len(sigmas) > 1 else sigmas[0]
    dt = sigma_next - sigma  # negative: from noise towards data
    # at sigma = 1 the ratio is infinite; like Flow-GRPO, use the next level there
    ratio = sigma / (1 - torch.where(sigma >= 1, sigma_max, sigma))
    std_dev_t = noise_level * ratio.sqrt()
    x, v = sample.float(), model_output.float()
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    step_std = std_dev_t * (-dt).sqrt()
    return mean, step_std


def flow_sde_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    step_index: int | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic rectified-flow step `sigma_i -> sigma_{i+1}` (Flow-GRPO) and its log-probability.

    Args:
        scheduler (`FlowMatchEulerDiscreteScheduler`): with `set_timesteps` called (`scheduler.sigmas` is used).
        model_output (`torch.Tensor`): the predicted velocity `v = noise - x0`.
        step_index (`int` or `torch.LongTensor`): index into `scheduler.sigmas` of the current noise level, one for the
            batch or one per sample.
        noise_level (`float`, *optional*, defaults to 0.7): `a` in `std_dev_t = a sqrt(sigma / (1 - sigma))`;
            0 gives the plain Euler ODE step (no density).
    """
    mean, step_std = flow_sde_step_mean_std(scheduler, model_output, step_index, sample, noise_level)
    if prev_sample is None:
        prev_sample = mean + step_std * _randn(model_output.shape, generator, mean)
    log_prob = gaussian_log_prob(prev_sample.detach().float(), mean, step_std.expand_as(mean))
    return prev_sample.to(sample.dtype), log_prob


def gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`KL(N(mean, std^2) || N(reference_mean, std^2))` per dimension, averaged over all but the batch axis (the scale
    of the averaged log-probs); rows whose step has no noise (std 0) get 0."""
    safe_std = torch.where(std > 0, std, torch.ones_like(std))
    kl = ((mean - reference_mean) ** 2 / (2 * safe_std**2)).mean(dim=tuple(range(1, mean.dim())))
    noisy = (std > 0).reshape(std.shape[0], -1)[:, 0]  # std is one value per sample
    return torch.where(noisy, kl, torch.zeros_like(kl))


def _randn(shape, generator, like: torch.Tensor) -> torch.Tensor:
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=like.dtype) for g in generator]).to(
            like.device
        )
    return torch.randn(shape, generator=generator, dtype=like.dtype).to(like.device)
