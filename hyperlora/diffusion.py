"""The diffusion training objective's pieces, shared by every trainer (toy UNet and ControlNet, HyperLoRA's stages)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


def noisy_inputs(scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator,
                 max_timestep: int = 0):  # fmt: skip
    """(noisy latents, timesteps, target) of one batch, noise then timesteps drawn from `generator` (uniform over
    the training timesteps, or over [0, max_timestep) when it is set: the lower-noise part where a face's details
    are drawn). The target is the scheduler's `prediction_type`: the noise (Ho et al. 2020, eq. 14) or the velocity
    v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022)."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    high = max_timestep or scheduler.config.num_train_timesteps
    if not 0 < high <= scheduler.config.num_train_timesteps:
        raise ValueError(f"max_timestep must be in 1..{scheduler.config.num_train_timesteps}, got {max_timestep}")
    timesteps = torch.randint(high, (len(latents),), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")
    return noisy, timesteps, target


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(SNR, gamma) on the x0 loss, expressed for the scheduler's
    target (/ SNR for epsilon, / (SNR + 1) for v); ones when snr_gamma is None."""
    if snr_gamma is None:
        return torch.ones(len(timesteps), device=timesteps.device)
    snr = compute_snr(scheduler, timesteps)
    epsilon = scheduler.config.prediction_type == "epsilon"
    return torch.clamp(snr, max=snr_gamma) / (snr if epsilon else snr + 1)


def diffusion_loss(unet, scheduler: DDPMScheduler, batch: dict, generator: torch.Generator,
                   snr_gamma: float | None = None, *, unet_inputs: Callable | None = None) -> torch.Tensor:  # fmt: skip
    """The DDPM MSE of one SDXL batch (`latents`, `encoder_hidden_states`, `text_embeds`, `time_ids`) against the
    scheduler's target, Min-SNR-gamma weighted if `snr_gamma`. `unet_inputs(noisy, timesteps, batch)`, if given,
    returns more UNet keyword arguments computed from the noisy latents (a ControlNet's residuals)."""
    noisy, timesteps, target = noisy_inputs(scheduler, batch["latents"], generator)
    added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
    extra = unet_inputs(noisy, timesteps, batch) if unet_inputs is not None else {}
    prediction = unet(noisy, timesteps, batch["encoder_hidden_states"], added_cond_kwargs=added, **extra).sample
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * snr_weights(scheduler, timesteps, snr_gamma)).mean()
