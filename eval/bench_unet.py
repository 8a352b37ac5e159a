"""Toy UNet training throughput by torch thread count: `python eval/bench_unet.py [--threads 1 2] [--steps 40]`.

One step is the default toy UNet's forward, backward and AdamW update on a batch of random latents and text
states of the toy world's shapes (CLIP text towers, VAE latent channels), as in `train_unet`. Prints steps/s.
Run it on an otherwise idle machine: a second job on 2 cores changes the figures.
"""

from __future__ import annotations

import argparse
import time

import torch

from hyperlora.toy.clip import CLIPTrainConfig
from hyperlora.toy.unet import UNetTrainConfig, build_toy_unet
from hyperlora.toy.vae import VAETrainConfig


def bench(threads: int, steps: int, warmup: int = 5, seed: int = 0) -> float:
    """Training steps per second of the default toy UNet on `threads` torch threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unet_config, clip_config = UNetTrainConfig(), CLIPTrainConfig()
    channels, size = VAETrainConfig().latent_channels, unet_config.image_size // 4
    width = 2 * clip_config.text_hidden  # both text encoders' states, concatenated as in SDXL
    unet = build_toy_unet(unet_config, cross_attention_dim=width, pooled_dim=clip_config.projection_dim,
                          latent_channels=channels)  # fmt: skip
    optimizer = torch.optim.AdamW(unet.parameters(), lr=unet_config.lr)
    batch = unet_config.batch_size
    latents, text = torch.randn(batch, channels, size, size), torch.randn(batch, 77, width)
    added = {"text_embeds": torch.randn(batch, clip_config.projection_dim), "time_ids": torch.zeros(batch, 6)}

    def step():
        timesteps = torch.randint(0, 1000, (batch,))
        out = unet(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
        out.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per thread count")
    args = parser.parse_args()
    for threads in args.threads:
        print(f"{threads} thread(s): {bench(threads, args.steps):5.2f} steps/s")


if __name__ == "__main__":
    main()
