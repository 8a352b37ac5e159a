"""Tiny seeded, offline components shared by the tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.worlds.sdxl import build_unet, tiny_pipeline, unet_inputs


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clip_tokenizer")


@pytest.fixture
def unet():
    unet = build_unet("tiny", seed=0)
    unet.requires_grad_(False)
    return unet


@pytest.fixture
def inputs(unet):
    return unet_inputs(unet, batch=2, seed=1)


def random_hyperlora(unet, seed: int = 0, **overrides) -> HyperLoRA:
    """A tiny HyperLoRA whose up bases are random too, so its LoRAs are not zero."""
    torch.manual_seed(seed)
    return HyperLoRA(preset("tiny", **overrides), find_targets(unet)).randomize_up_bases(0.5, seed)


def reference_features(model: HyperLoRA, n: int, seed: int = 0) -> dict:
    """Random ArcFace embeddings (unit norm) and CLIP tokens for n reference images."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    arcface = torch.nn.functional.normalize(torch.randn(n, config.id_embed_dim, generator=g), dim=-1)
    clip = torch.randn(n, 5, config.dim, generator=g)
    return {"arcface": arcface, "clip": clip}


@pytest.fixture
def pipe(tokenizer_dir):
    return tiny_pipeline(tokenizer_dir, seed=0)


@pytest.fixture(scope="session")
def tiny_stage3(tmp_path_factory):
    """(a stage-3 toy checkpoint, its training pool folder) of 3 people x 2 looks, trained 2 steps."""
    from hyperlora.train.config import resolve
    from hyperlora.train.loop import train_stage

    out = tmp_path_factory.mktemp("tiny_stage3")
    run = {"num_identities": 3, "images_per_identity": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
           "threads": 1}  # fmt: skip
    config = resolve("toy", 3, run=run, stage_overrides={"steps": 2, "warmup_steps": 1})
    model = train_stage(config, out / "stage3", cache_dir=out / "cache", progress=False)
    (pool,) = (out / "cache").glob("train-*")
    return str(model), str(pool)
