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
