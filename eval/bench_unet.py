"""Toy UNet training throughput by torch thread count and batch size:
`python eval/bench_unet.py [--threads 1 2] [--batch 16 32] [--steps 40]`.

One step is `train_unet`'s own (`hyperlora.toy.unet.train_step`: batch, diffusion loss, backward, gradient
clipping, AdamW, learning-rate schedule, EMA) for the default toy UNet, on a cache of random latents and text
states of the toy world's shapes (CLIP text towers, VAE latent channels). Prints steps/s and images/s.
Run it on an otherwise idle machine: a second job on 2 cores changes the figures.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator

from hyperlora.toy.clip import CLIPTrainConfig
from hyperlora.toy.unet import TrainingCache, UNetTrainConfig, build_toy_unet, train_step, training_state
from hyperlora.toy.vae import VAETrainConfig


def random_cache(config: UNetTrainConfig) -> TrainingCache:
    """One batch of random VAE latents and text states, shaped as the toy CLIP's text towers and VAE give them."""
    clip_config, n = CLIPTrainConfig(), config.batch_size
    channels, size = VAETrainConfig().latent_channels, config.image_size // 4
    width, pooled = 2 * clip_config.text_hidden, clip_config.projection_dim  # both encoders' states, as in SDXL
    return TrainingCache(
        latent_mean=torch.randn(n, channels, size, size), latent_std=torch.ones(n, channels, size, size),
        prompt_embeds=torch.randn(n, 77, width), pooled=torch.randn(n, pooled),
        empty_embeds=torch.zeros(1, 77, width), empty_pooled=torch.zeros(1, pooled), scaling_factor=1.0,
    )  # fmt: skip


def bench(threads: int, steps: int, warmup: int = 5, seed: int = 0, batch_size: int | None = None) -> float:
    """Training steps per second of the default toy UNet on `threads` torch threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    config = UNetTrainConfig(seed=seed, **({} if batch_size is None else {"batch_size": batch_size}))
    cache = random_cache(config)
    unet = build_toy_unet(config, cross_attention_dim=cache.prompt_embeds.shape[-1],
                          pooled_dim=cache.pooled.shape[-1], latent_channels=cache.latent_mean.shape[1])  # fmt: skip
    unet, state = training_state(unet, config, Accelerator(mixed_precision=config.mixed_precision))
    unet.train()
    for _ in range(warmup):
        train_step(unet, cache, state, config)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(unet, cache, state, config)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[UNetTrainConfig().batch_size],
                        help="batch sizes (default: the trainer's)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per thread count")
    args = parser.parse_args()
    for threads in args.threads:
        for batch in args.batch:
            rate = bench(threads, args.steps, batch_size=batch)
            print(f"{threads} thread(s), batch {batch:3d}: {rate:5.2f} steps/s, {rate * batch:6.1f} images/s")


if __name__ == "__main__":
    main()
