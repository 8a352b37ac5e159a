"""The CNN teacher: its distillation targets sit on the ViT's patch grid (its training is tested through
`attribute_ceiling` in test_toy_diagnostics.py)."""

import pytest
import torch

from hyperlora.toy.data import split_renders
from hyperlora.toy.identity import LOOK_ATTRIBUTES
from hyperlora.toy.teacher import AttributeCNN, attribute_labels, distillation_targets


@pytest.mark.parametrize("grid, tokens, channels", [(16, 256, 6), (8, 64, 8), (4, 16, 10), (2, 4, 10)])
def test_distillation_targets_sit_on_the_patch_grid_and_are_standardised(grid, tokens, channels):
    torch.manual_seed(0)
    model, images = AttributeCNN(widths=(4, 6, 8, 10)), torch.rand(12, 3, 64, 64) * 2 - 1  # maps of 32, 16, 8, 4 px
    dense, pooled = distillation_targets(model.eval(), images, grid, batch=5)
    assert dense.shape == (12, tokens, channels) and pooled.shape == (12, 10)
    for x in (dense.reshape(-1, channels), pooled):
        assert torch.allclose(x.mean(0), torch.zeros(x.shape[1]), atol=1e-3)
        std = x.std(0)  # 1, or 0 for a channel that never fires (ReLU) in a random network
        assert (((std - 1).abs() < 1e-2) | (std == 0)).all() and (std > 0).any(), std


def test_labels_mark_invisible_attributes_for_the_losses_to_skip():
    train = split_renders("train", 60, 1, 0)
    labels, hair = attribute_labels(train), list(LOOK_ATTRIBUTES).index("hair_colour")
    bald = torch.tensor([a["hairstyle"] == "bald" for a in train["attributes"]])
    assert labels.shape == (60, len(LOOK_ATTRIBUTES)) and bald.any() and (~bald).any()
    assert (labels[bald, hair] == -100).all() and (labels[~bald, hair] >= 0).all()
