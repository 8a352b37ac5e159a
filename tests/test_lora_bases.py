"""ID bases from per-person free LoRAs: the batched fit, its resume, and bases that reproduce the people's LoRAs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.coefficient_targets import distill, load_tables
from eval.lora_bases import (
    LORAS_FILE,
    build_bases,
    delta_error,
    fit_loras,
    fit_readout,
    load_loras,
    main,
    principal_bases,
)
from hyperlora.checkpoint import load_checkpoint
from hyperlora.config import HyperLoRAConfig
from hyperlora.lora import LoRAWeights
from hyperlora.train.data import TRAINING_SET_FILE, TrainingSet


def _fit(tiny_stage3, out, steps, **kw):
    checkpoint, pool = tiny_stage3
    return fit_loras(checkpoint, pool, [0, 1, 2], out, steps=steps, looks=2, progress=False, **kw)


@pytest.fixture(scope="module")
def fitted(tiny_stage3, tmp_path_factory):
    out = tmp_path_factory.mktemp("free_loras")
    _fit(tiny_stage3, out, 4, lr=1e-2)
    return out


def test_a_fit_resumed_from_its_saved_loras_ends_where_an_uninterrupted_one_does(tiny_stage3, fitted, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    monkeypatch.setattr("eval.coefficient_targets.SAVE_EVERY", 2)
    _fit(tiny_stage3, tmp_path, 2, lr=1e-2)
    split = load_file(str(_fit(tiny_stage3, tmp_path, 4, lr=1e-2)))
    whole = load_file(str(fitted / LORAS_FILE))
    assert int(split["done"]) == int(whole["done"]) == 4
    assert all(torch.equal(whole[k], split[k]) for k in whole if k.endswith(".raw")), "resume must be exact"
    model = load_checkpoint(tiny_stage3[0])
    people, loras = load_loras([str(fitted)], model)
    assert people.tolist() == [0, 1, 2]
    downs = [down for down, _ in loras.values()]
    ups = [up for _, up in loras.values()]
    assert all(u.abs().sum() > 0 for u in ups), "every lora_up moves off zero"
    assert any(not torch.equal(d[0], d[1]) for d in downs), "the people's LoRAs move apart from the shared start"


def test_principal_bases_reproduce_people_in_their_span_with_unit_coefficients_on_average():
    factors = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    bases, projection = principal_bases(factors, 8)
    coefficients = factors @ projection
    assert torch.allclose(coefficients @ bases, factors, atol=1e-4), "five people in eight bases: exact"
    assert torch.allclose(coefficients.norm(dim=1), torch.ones(5), atol=1e-4), "P <= K: every row has norm 1"
    assert bases[5:].abs().sum() == 0, "no direction beyond the people's"
    bases, projection = principal_bases(factors, 3)
    coefficients = factors @ projection
    assert coefficients.pow(2).sum(1).mean() == pytest.approx(1.0, abs=1e-4)
    error = (coefficients @ bases - factors).norm() / factors.norm()
    assert 0.1 < error < 1, "three bases keep the leading part of five people"


def test_bases_built_from_the_loras_reproduce_them_and_change_only_the_id_bases(tiny_stage3, fitted, tmp_path):
    checkpoint, pool = tiny_stage3
    summary = build_bases(checkpoint, [str(fitted)], tmp_path / "b", held_out=1)
    assert summary["delta_error_unit_in_bases"] < 1e-3, "two people in K bases: their tokens give back their LoRAs"
    assert summary["delta_error_raw_held_out"] > 1e-2, "a third person is not in the span of two"
    before, after = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "b" / "model")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert all(torch.equal(b[k], a[k]) for k in b if "id_" not in k or "basis" not in k), "only the ID bases change"
    assert all(not torch.equal(b[k], a[k]) for k in b if "id_up_basis" in k)
    _, tokens, _ = load_tables([str(tmp_path / "b")])
    _, loras = load_loras([str(fitted)], after)
    free = LoRAWeights(loras, after.config.rank, HyperLoRAConfig.alpha(after.config.rank))
    assert delta_error(free, after.assemble(tokens)).tolist()[:2] == pytest.approx([0, 0], abs=1e-3)
    assert len(load_checkpoint(tmp_path / "b" / "hyperlora").state_dict()) == len(after.state_dict())
    result = distill(str(tmp_path / "b" / "model"), pool, [str(tmp_path / "b")], tmp_path / "d", val_people=1, steps=2,
                     batch_size=2, progress=False)  # fmt: skip
    assert result["people"] == 3
    grown = build_bases(checkpoint, [str(fitted)], tmp_path / "g", hyper_dim=before.config.hyper_dim + 4)
    assert grown["hyper_dim"] == before.config.hyper_dim + 4 and grown["delta_error_unit_in_bases"] < 1e-3
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["in_bases"] == 3


def test_the_readout_refits_only_the_output_projection_towards_the_rows(tiny_stage3, fitted, tmp_path):
    checkpoint, pool = tiny_stage3
    build_bases(checkpoint, [str(fitted)], tmp_path / "b")
    summary = fit_readout(str(tmp_path / "b" / "model"), pool, [str(tmp_path / "b")], tmp_path / "r", val_people=1)
    before, after = load_checkpoint(tmp_path / "b" / "model"), load_checkpoint(tmp_path / "r" / "model")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    assert changed == {"resampler.proj_out.weight", "resampler.proj_out.bias"}
    _, rows, _ = load_tables([str(tmp_path / "b")])
    data, _ = TrainingSet.load(Path(pool) / TRAINING_SET_FILE)
    chosen = (data.person < 2) & data.valid
    with torch.no_grad():
        old, new = (m.id_coefficients(clip=data.clip_id[chosen].float(), arcface=data.arcface[chosen].float())
                    for m in (before, after))  # fmt: skip
    target = rows[data.person[chosen]]
    cosine = lambda x: torch.nn.functional.cosine_similarity(x, target, dim=-1).mean()
    assert cosine(new) > cosine(old) + 0.05, "the refitted readout predicts the training people's rows better"
    assert -1 <= summary["val_cosine"] <= 1 and summary["people"] == 3
    with pytest.raises(ValueError, match="--val-people"):
        fit_readout(str(tmp_path / "b" / "model"), pool, [str(tmp_path / "b")], tmp_path / "x", val_people=3)


def test_bad_arguments_are_refused(tiny_stage3, fitted, tmp_path):
    checkpoint, _ = tiny_stage3
    with pytest.raises(ValueError, match="--held-out"):
        build_bases(checkpoint, [str(fitted)], tmp_path / "x", held_out=2)
    with pytest.raises(ValueError, match="--hyper-dim"):
        build_bases(checkpoint, [str(fitted)], tmp_path / "x", hyper_dim=2)
    with pytest.raises(SystemExit):
        main(["bases", "--checkpoint", checkpoint, "--loras", str(tmp_path), "--out", str(tmp_path / "y")])
    with pytest.raises(SystemExit):
        main(["fit", "--checkpoint", checkpoint, "--cache", str(tmp_path), "--people", "0:2", "--out", str(tmp_path)])
    assert not (tmp_path / "y").exists()


def test_a_fit_with_the_identity_loss_logs_it_and_moves_the_loras_elsewhere(tiny_stage3, tmp_path):
    from hyperlora.toy.face_recognizer import RecognizerTrainConfig, fit_recognizer
    from hyperlora.toy.faces import _save_weights

    config = RecognizerTrainConfig.smoke(crop="box")
    recognizer = tmp_path / "recognizer.safetensors"
    _save_weights(fit_recognizer(config)[0], config, recognizer)
    plain = load_file(str(_fit(tiny_stage3, tmp_path / "plain", 20, lr=1e-2)))
    with_id = load_file(str(_fit(tiny_stage3, tmp_path / "id", 20, lr=1e-2, id_loss_weight=1.0,
                                 id_recognizer=str(recognizer))))  # fmt: skip
    last = json.loads((tmp_path / "id" / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 20 and last["loss_id"] > 0
    assert "loss_id" not in json.loads((tmp_path / "plain" / "log.jsonl").read_text().splitlines()[-1])
    assert not torch.equal(plain["0.raw"], with_id["0.raw"]), "the identity loss changes what the fit learns"
