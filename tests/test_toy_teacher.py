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


def test_sub_patch_targets_give_each_token_the_cells_inside_its_patch():
    torch.manual_seed(0)
    model, images = AttributeCNN(widths=(4, 6, 8, 10)).eval(), torch.rand(3, 3, 64, 64) * 2 - 1
    coarse, _ = distillation_targets(model, images, 8)
    dense, _ = distillation_targets(model, images, 8, sub=2)
    assert dense.shape == (3, 64, 8 + 2 * 2 * 6)  # the 8 x 8 map's 8 channels, then 4 cells of the 16 x 16 map
    assert torch.allclose(dense[..., :8], coarse, atol=1e-5)
    with torch.no_grad():
        fine = model.features(images)[1]  # [3, 6, 16, 16]
    row, col, r, c = 2, 5, 1, 0  # token (2, 5), its lower-left cell: pixel (5, 10) of the 16 x 16 map
    raw = fine[:, :, 2 * row + r, 2 * col + c]
    flat = fine[:, :, r::2, c::2].permute(0, 2, 3, 1).reshape(-1, 6)  # each cell's channels are standardised apart
    expected = (raw - flat.mean(0)) / flat.std(0).clamp_min(1e-6)
    cell = dense[:, row * 8 + col, 8 + (r * 2 + c) * 6 : 8 + (r * 2 + c + 1) * 6]
    assert torch.allclose(cell, expected, atol=1e-4)


def test_identity_trait_labels_read_each_persons_traits_and_bin_held_out_people_alike():
    from hyperlora.toy.identity import identity_params, split_identities
    from hyperlora.toy.teacher import CONTINUOUS_TRAITS, TRAIT_CATEGORIES, identity_trait_labels

    train = list(split_identities("train", 400))
    labels, classes, edges = identity_trait_labels(train)
    assert labels.shape == (400, len(classes)) and len(CONTINUOUS_TRAITS) >= 15
    names = list(classes)
    person = identity_params(train[7])
    assert labels[7, names.index("skin_tone")] == TRAIT_CATEGORIES["skin_tone"].index(person.skin_tone)
    assert labels[7, names.index("scar")] == int(person.scar is not None)
    width = labels[:, names.index("face_width")]
    assert torch.bincount(width).tolist() == [100] * 4, "quantile bins are balanced on the identities they come from"
    assert all((labels[:, j] < n).all() and (labels[:, j] >= 0).all() for j, n in enumerate(classes.values()))
    held = list(split_identities("val"))[:50]
    again, _, _ = identity_trait_labels(held, edges=edges)
    alone, _, _ = identity_trait_labels(held)
    assert not torch.equal(again, alone), "held-out people are binned on the training edges, not their own"
