"""The identity-trait reader, eval's second ID judge: training, the saved file, and its match score."""

import json

import numpy as np
import pytest
import torch

from hyperlora.toy.render import split_identities
from hyperlora.toy.teacher import AttributeCNN, identity_trait_labels
from hyperlora.toy.trait_reader import (
    WEIGHTS,
    TraitReader,
    TraitReaderConfig,
    save_trait_reader,
    train_trait_reader,  # fmt: skip
)


def make_reader(folder, readable=("skin_tone", "iris_colour", "brow_colour")) -> TraitReader:
    """An untrained reader whose readable traits are set by hand (plumbing: its reads mean nothing)."""
    config = TraitReaderConfig.smoke()
    _, classes, edges = identity_trait_labels(split_identities("train")[:32], bins=config.bins)
    torch.manual_seed(0)
    model = AttributeCNN(widths=config.widths, classes=classes).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_trait_reader(folder, model, config, classes, edges, list(readable))
    return TraitReader.load(folder)


def test_smoke_training_writes_weights_card_and_per_trait_figures(tmp_path):
    figures = train_trait_reader(tmp_path, TraitReaderConfig.smoke())
    assert (tmp_path / WEIGHTS).is_file()
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert set(card["figures"]["per_trait"]) >= {"skin_tone", "iris_colour", "moles", "face_width"}
    assert all(0 <= t["accuracy"] <= 1 and 0 < t["majority"] <= 1 for t in figures["per_trait"].values())
    if not figures["readable"]:  # 4 steps read nothing: loading it must say so rather than judge by chance
        with pytest.raises(ValueError, match="reads no trait above chance"):
            TraitReader.load(tmp_path)


def test_reload_reads_like_the_saved_network(tmp_path):
    reader = make_reader(tmp_path / "r")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    read = reader.read(images)
    assert read.shape == (3, len(reader.names)) and reader.readable == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="train-traits"):
        TraitReader.load(tmp_path / "missing")


def test_match_is_the_fraction_of_readable_traits_read_as_the_persons_own(tmp_path, monkeypatch):
    reader = make_reader(tmp_path / "r")
    person, other = 1_000_000, 1_000_001
    own, theirs = reader.truth([person]), reader.truth([other])
    monkeypatch.setattr(reader, "read", lambda images: torch.cat([own, theirs]))
    match = reader.match(np.zeros((2, 64, 64, 3), np.uint8), person)
    expected_other = float((own[0, :3] == theirs[0, :3]).float().mean())
    assert match[0] == 1.0 and match[1] == pytest.approx(expected_other) and expected_other < 1.0


def test_rescore_adds_trait_match_to_a_saved_run_and_pairs_the_control(tmp_path, monkeypatch):
    from PIL import Image

    from eval.rescore import rescore

    make_reader(tmp_path / "traits")
    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    records = []
    for variant in ("hyperlora", "hyperlora_other"):
        for identity in (1_000_000, 1_000_001):
            name = f"images/{variant}_{identity}.png"
            Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(run / name)
            records.append(dict(variant=variant, identity=identity, prompt_index=0, seed_index=0, id_sim=0.1,
                                image=name))  # fmt: skip
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"config": {"world": "toy"}}))
    result = rescore(run, tmp_path / "traits")
    rescored = [json.loads(line) for line in (run / "records_traits.jsonl").read_text().splitlines()]
    assert all(0 <= r["trait_match"] <= 1 for r in rescored) and set(result["variants"]) == {"hyperlora", "hyperlora_other"}
    assert result["control_gap"]["trait_match"]["n_pairs"] == 2
    (run / "config.json").write_text(json.dumps({"config": {"world": "sdxl"}}))
    with pytest.raises(ValueError, match="only toy runs"):
        rescore(run, tmp_path / "traits")


def test_face_texture_is_added_to_a_saved_toy_run_and_nothing_else_changes(tmp_path):
    from PIL import Image

    from eval.rescore import add_face_texture, main
    from hyperlora.toy.render import render_sample

    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    records = []
    for variant, specks in (("hyperlora", False), ("hyperlora_other", True)):
        image = render_sample(0, 0, seed=0, size=128).image.copy()
        if specks:  # colour specks over the whole picture, the face included
            image[::3, ::3] = (30, 60, 220)
        name = f"images/{variant}.png"
        Image.fromarray(image).save(run / name)
        records.append({"variant": variant, "identity": 0, "prompt_index": 0, "seed_index": 0, "id_sim": 0.1,
                        "image": name})  # fmt: skip
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.json").write_text(json.dumps({"config": {"world": "toy"}}))
    means = add_face_texture(run)
    backfilled = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "face_texture"} for r in backfilled] == records
    assert means["hyperlora_other"] > means["hyperlora"] > 0, "the specked face is the busier one"
    assert main(["--face-texture", str(run)]) == 0 and add_face_texture(run) == means, "a second pass adds nothing"
    (run / "config.json").write_text(json.dumps({"config": {"world": "sdxl"}}))
    with pytest.raises(ValueError, match="only toy runs"):
        add_face_texture(run)


def test_toy_info_lists_the_shipped_reader():
    from hyperlora.toy.build import info

    row = next(r for r in info() if r["folder"] == "traits")
    assert row["present"] and row["card"] and row["passed"] and row["mb"] < 3
