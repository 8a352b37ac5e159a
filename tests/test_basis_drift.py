"""eval.basis_drift: how far a hypernetwork's basis banks moved from their seeded start or another checkpoint."""

import pytest
import torch
from accelerate.utils import set_seed

from eval.basis_drift import bank_drift, main, seeded_init
from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.checkpoint import save_checkpoint


def _fresh(unet, seed: int) -> HyperLoRA:
    set_seed(seed)
    return HyperLoRA(preset("tiny"), find_targets(unet))


def test_the_seeded_init_is_the_start_of_a_run_with_that_seed(unet):
    start = _fresh(unet, 3)
    same = bank_drift(start, seeded_init(start, 3))
    other = bank_drift(start, seeded_init(start, 4))
    assert same["id_down_basis"]["change"] == 0.0
    assert other["id_down_basis"]["change"] == pytest.approx(2**0.5, abs=0.1)  # two independent draws
    assert same["id_up_basis"]["change"] is None and same["id_up_basis"]["norm"] == 0.0  # up bases start at zero


def test_a_trained_bank_reads_its_relative_change(unet):
    start = _fresh(unet, 0)
    moved = _fresh(unet, 0)
    with torch.no_grad():
        for name, param in moved.named_parameters():
            if name.endswith("id_down_basis"):
                param.mul_(1.1)
            if name.endswith("id_up_basis"):
                param.fill_(0.5)
    drift = bank_drift(moved, start)
    assert drift["id_down_basis"]["change"] == pytest.approx(0.1, rel=1e-4)
    assert drift["id_up_basis"]["change"] is None and drift["id_up_basis"]["norm"] > 0
    assert "base_down_basis" not in drift or drift["base_down_basis"]["change"] == 0.0


def test_hypernetworks_of_another_layout_are_refused(unet):
    with pytest.raises(ValueError, match="differ in layout"):
        bank_drift(_fresh(unet, 0), HyperLoRA(preset("tiny", hyper_dim=4), find_targets(unet)))


def test_cli_reads_the_seed_from_config_and_names_a_missing_one(unet, tmp_path, capsys, monkeypatch):
    model = _fresh(unet, 5)
    import eval.basis_drift as drift

    monkeypatch.setattr(drift, "load_checkpoint", lambda folder, **_: model)  # the tiny UNet's layout
    seeded = save_checkpoint(model, tmp_path / "seeded", extra={"run_config": {"run": {"seed": 5}}})
    main([str(seeded)])
    assert "| 0.000 (norm" in capsys.readouterr().out
    bare = save_checkpoint(model, tmp_path / "bare")
    with pytest.raises(ValueError, match="records no run seed"):
        main([str(bare)])
