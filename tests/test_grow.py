"""hyperlora.train.grow: a trained hypernetwork widened to more bases (K) or a higher rank starts where it was."""

import pytest
import torch

from hyperlora.checkpoint import load_checkpoint, save_checkpoint
from hyperlora.train.grow import grow, lora_change, main

from .conftest import random_hyperlora, reference_features


def _features(model):
    features = reference_features(model, 2, seed=3)
    features["clip_blurred"] = torch.randn_like(features["clip"])
    return features


def test_growing_the_rank_keeps_every_generated_lora(unet):
    model = random_hyperlora(unet, seed=1)
    wide = grow(model, rank=2 * model.config.rank)
    assert wide.config.rank == 2 * model.config.rank and wide.config.hyper_dim == model.config.hyper_dim
    features = _features(model)
    assert lora_change(model, wide, features) < 1e-6  # new down columns meet zero up rows
    assert lora_change(model, wide, {k: v for k, v in features.items() if k != "clip_blurred"}) < 1e-6


def test_growing_k_moves_the_loras_in_proportion_to_the_new_rows_scale_and_lets_the_new_bases_learn(unet):
    model = random_hyperlora(unet, seed=1)
    k = model.config.hyper_dim
    features = _features(model)
    exact = grow(model, hyper_dim=2 * k, new_row_scale=0.0)
    assert lora_change(model, exact, features) < 1e-6
    nudged = grow(model, hyper_dim=2 * k, new_row_scale=0.01)
    change = lora_change(model, nudged, features)
    assert 0 < change < 0.1
    assert lora_change(model, grow(model, hyper_dim=2 * k, new_row_scale=0.001), features) < change / 5
    layer = nudged.lora_modules[0].to_q
    assert torch.equal(layer.id_down_basis[:k], model.lora_modules[0].to_q.id_down_basis)
    assert layer.id_up_basis[k:].abs().max() == 0 and layer.id_down_basis[k:].abs().max() > 0
    # the zero new up bases get a gradient through the nudged coefficients: they can train
    ids = nudged.assemble(nudged.coefficients(**features)["id"], "id")
    sum((up @ down).square().sum() for down, up in ids.layers.values()).backward()
    assert layer.id_up_basis.grad[k:].abs().max() > 0
    exact_ids = exact.assemble(exact.coefficients(**features)["id"], "id")
    sum((up @ down).square().sum() for down, up in exact_ids.layers.values()).backward()
    assert exact.lora_modules[0].to_q.id_up_basis.grad[k:].abs().max() == 0  # why the nudge is there


def test_shrinking_or_no_change_is_refused(unet):
    model = random_hyperlora(unet)
    with pytest.raises(ValueError, match="only widens"):
        grow(model, hyper_dim=model.config.hyper_dim - 1)
    with pytest.raises(ValueError, match="nothing to grow"):
        grow(model)
    with pytest.raises(ValueError, match="new_row_scale"):
        grow(model, rank=16, new_row_scale=1.5)


def test_cli_writes_a_wider_checkpoint_that_loads(unet, tmp_path, capsys):
    model = random_hyperlora(unet, seed=2)
    save_checkpoint(model, tmp_path / "src")
    k = model.config.hyper_dim
    assert main([str(tmp_path / "src"), "--hyper-dim", str(2 * k), "--out", str(tmp_path / "wide")]) == 0
    wide = load_checkpoint(tmp_path / "wide", unet=unet, dtype=torch.float32)
    assert wide.config.hyper_dim == 2 * k
    assert lora_change(model, wide, _features(model)) < 0.1
    assert "move by at most" in capsys.readouterr().out
    assert main([str(tmp_path / "src"), "--rank", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "only widens" in capsys.readouterr().err and not (tmp_path / "bad").exists()
