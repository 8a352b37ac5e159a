"""Per-person coefficient rows fitted with the stage loss, and a resampler distilled onto them (tiny pool)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from eval.coefficient_targets import TABLE_FILE, distill, fit_table, main, parse_people
from hyperlora.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_stage3):
    return tiny_stage3


def _fit(trained, out, steps, **kw):
    checkpoint, pool = trained
    return fit_table(checkpoint, pool, [0, 1, 2], out, steps=steps, looks=2, progress=False, **kw)


def test_a_fit_resumed_from_its_saved_rows_ends_where_an_uninterrupted_one_does(trained, tmp_path, monkeypatch):
    monkeypatch.setattr("eval.coefficient_targets.SAVE_EVERY", 2)
    whole = load_file(str(_fit(trained, tmp_path / "whole", 4)))
    _fit(trained, tmp_path / "split", 2)
    with open(tmp_path / "split" / "log.jsonl", "a") as log:  # a line logged after the saved rows, then killed
        log.write(json.dumps({"step": 3, "loss": 1.0}) + "\n")
    split = load_file(str(_fit(trained, tmp_path / "split", 4)))
    assert int(whole["done"]) == int(split["done"]) == 4
    assert torch.equal(whole["raw"], split["raw"]), "resuming from the saved rows and Adam's moments must be exact"
    assert not torch.allclose(whole["tokens"], whole["start"], atol=1e-4), "the rows must move off the resampler's"
    assert torch.allclose(whole["tokens"].norm(dim=-1), torch.ones(()), atol=1e-5), "the tokens are unit-norm"
    assert whole["people"].tolist() == [0, 1, 2]
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert 3 not in logged, "a resumed fit drops the lines logged after its saved rows"


def test_distilling_moves_the_resampler_towards_the_rows_and_only_the_resampler(trained, tmp_path):
    checkpoint, pool = trained
    table = tmp_path / "fit"
    _fit(trained, table, 6, lr=0.3)
    summary = distill(checkpoint, pool, [str(table)], tmp_path / "distilled", val_people=1, steps=60, lr=1e-3,
                      batch_size=4, progress=False)  # fmt: skip
    assert summary["end"]["train_cosine"] > summary["start"]["train_cosine"] + 0.01
    before, after = load_checkpoint(checkpoint), load_checkpoint(tmp_path / "distilled" / "model")
    b, a = dict(before.named_parameters()), dict(after.named_parameters())
    assert all(torch.equal(b[k], a[k]) for k in b if "basis" in k or k.startswith("base_resampler.")), "bases frozen"
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("resampler.")), "the resampler must train"
    log = [json.loads(line) for line in (tmp_path / "distilled" / "log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[-1]["step"] == 60


def test_bad_people_and_splits_are_refused(trained, tmp_path):
    assert parse_people("2:5") == [2, 3, 4] and parse_people("7,1") == [7, 1]
    for text in ("5:2", "-1,3", ""):
        with pytest.raises(ValueError, match="--people"):
            parse_people(text)
    checkpoint, pool = trained
    with pytest.raises(ValueError, match=r"people \[7\] have no valid image"):
        fit_table(checkpoint, pool, [0, 7], tmp_path / "x", steps=1, looks=2, progress=False)
    _fit(trained, tmp_path / "fit", 1)
    for val_people in (0, 3):
        with pytest.raises(ValueError, match="--val-people"):
            distill(checkpoint, pool, [str(tmp_path / "fit")], tmp_path / "d", val_people=val_people, steps=1,
                    progress=False)  # fmt: skip
    with pytest.raises(SystemExit):
        main(["fit", "--checkpoint", checkpoint, "--cache", str(tmp_path), "--people", "0:2", "--out", str(tmp_path)])
    assert (tmp_path / "fit" / TABLE_FILE).is_file()
