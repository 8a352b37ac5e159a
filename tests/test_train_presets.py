"""Training presets: labelled phases ("3-path"), presets that extend another, a preset's own schedule."""

import json
from pathlib import Path

import pytest

from hyperlora.train.__main__ import main as train_main
from hyperlora.train.__main__ import parser
from hyperlora.train.config import load_preset, phase_stage, preset_schedule, resolve
from hyperlora.train.ship import ship

# A tiny pool and 2 steps a phase: plumbing, not results (as tests/test_train.py).
TINY_RUN = {"num_identities": 3, "images_per_identity": 2, "batch_size": 4, "val_identities": 2, "val_every": 2,
            "checkpoint_every": 2, "log_every": 1, "threads": 1}  # fmt: skip
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()] + ["--steps", "2", "--warmup-steps", "1"]


def test_a_labelled_phase_runs_its_stage_with_the_plain_entry_then_its_own():
    plain, path = resolve("toy_fast", "3"), resolve("toy_fast", "3-path")
    assert path.stage.stage == 3 and path.stage.id_loss_weight == 0.3 and path.stage.id_loss_path_steps == 4
    assert path.stage.lr == 1e-4 and plain.stage.lr == 2e-4 and plain.stage.id_loss_weight == 0.0
    # inherited: toy's stage-3 face weight, toy_fast's stage-3 groups
    assert path.stage.face_loss_weight == plain.stage.face_loss_weight == 9.0
    assert path.stage.basis_lr_scale == plain.stage.basis_lr_scale == 3.0  # v5's bases, into the path phase too
    assert path.stage.train_groups == plain.stage.train_groups == ("id_basis", "resampler_core", "clip_path",
                                                                    "arcface_path")  # fmt: skip
    assert resolve("toy_fast", "3-path", stage_overrides={"steps": 7}).stage.steps == 7
    with pytest.raises(ValueError, match="no phase '3-nope'; its phases: none"):
        resolve("toy", "3-nope")
    for bad in ("4", "3-", "x-path", "", "0"):
        with pytest.raises(ValueError, match="unknown stage or phase"):
            phase_stage(bad)
    assert phase_stage(2) == 2 and phase_stage("3-path") == 3


def test_a_preset_extends_another_key_by_key_and_a_cycle_is_refused(tmp_path, monkeypatch):
    toy, fast = load_preset("toy"), load_preset("toy_fast")
    assert fast["model"] == toy["model"] and fast["run"] == {**toy["run"], "threads": 2}
    assert fast["stages"]["1"] == {**toy["stages"]["1"], "steps": 1500}
    assert fast["stages"]["2"] == toy["stages"]["2"]  # untouched stages come through whole
    assert preset_schedule("toy_fast") == ["1", "3", "3-path"] and preset_schedule("toy") == ["1", "2", "3"]

    class Folder:  # stands in for importlib.resources.files(package)
        @staticmethod
        def files(_package):
            return tmp_path

    (tmp_path / "a.json").write_text(json.dumps({"extends": "b"}))
    (tmp_path / "b.json").write_text(json.dumps({"extends": "a"}))
    (tmp_path / "c.json").write_text(json.dumps({"extends": "a", "stage": {}}))
    monkeypatch.setattr("hyperlora.train.config.resources", Folder)
    with pytest.raises(ValueError, match="extends itself"):
        load_preset("a")
    with pytest.raises(ValueError, match="unknown sections \\['stage'\\]"):
        load_preset("c")


def test_the_ablation_preset_files_resolve_and_the_measured_splits_keep_their_rates():
    # docs/ablations/fast_schedule's splits extend toy_fast; when toy_fast changed (session 29), each pinned what
    # it was measured with, so that its records' commands still train the model they describe.
    folder = Path(__file__).resolve().parents[1] / "docs" / "ablations" / "fast_schedule"
    files = sorted(folder.glob("toy_fast_v*.json"))
    assert len(files) >= 5
    for file in files:
        for phase in preset_schedule(str(file)):
            resolve(str(file), phase)
    scale = {f.stem: resolve(str(f), "3-path").stage.basis_lr_scale for f in files}
    assert scale.pop("toy_fast_v5") == 3.0 and set(scale.values()) == {1.0}, scale  # v1-v4 as measured
    assert resolve(str(folder / "toy_fast_v4.json"), "3").stage.lr == 4e-4


def test_the_cli_runs_a_presets_schedule_in_labelled_folders_and_ship_keeps_its_order(tmp_path, capsys):
    out = tmp_path / "fast"
    assert train_main(["--preset", "toy_fast", "--out", str(out), "--quiet", *TINY_FLAGS]) == 0
    assert "stage3-path" in capsys.readouterr().out
    assert json.loads((out / "schedule.json").read_text())["folders"] == ["stage1", "stage3", "stage3-path"]
    configs = [json.loads((out / f / "config.json").read_text()) for f in ("stage3", "stage3-path")]
    assert [c["stage"]["id_loss_weight"] for c in configs] == [0.0, 0.3]
    logged = [json.loads(line) for line in (out / "stage3-path" / "log.jsonl").read_text().splitlines()]
    assert any("loss_id" in line for line in logged)  # the identity loss ran, on the shipped recogniser
    card = json.loads((ship([out], tmp_path / "shipped") / "model_card.json").read_text())
    assert [s["stage"] for s in card["stages"]] == [1, 3, 3]
    assert [s["folder"].rsplit("/", 1)[-1] for s in card["stages"]] == ["stage1", "stage3", "stage3-path"]


def test_the_cli_refuses_a_phase_twice_or_one_the_preset_lacks(tmp_path, capsys):
    assert parser().parse_args(["--stages", "1,3,3-path", "--out", "x"]).stages == ["1", "3", "3-path"]
    assert train_main(["--stages", "1,3,1", "--out", str(tmp_path / "twice")]) == 2
    assert "runs a phase twice" in capsys.readouterr().err
    assert train_main(["--stages", "1,3-path", "--out", str(tmp_path / "none")]) == 2
    assert "preset 'toy' has no phase '3-path'" in capsys.readouterr().err
    assert train_main(["--stage", "5", "--out", str(tmp_path / "five")]) == 2
    assert "unknown stage or phase '5'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_preset_may_be_the_users_own_file_extending_a_shipped_one(tmp_path, capsys):
    mine = tmp_path / "mine.json"
    preset = {"extends": "toy_fast", "stages": {"3-path": {"steps": 11}}, "schedule": ["1", "3-path"]}
    mine.write_text(json.dumps(preset))
    assert preset_schedule(str(mine)) == ["1", "3-path"]
    config = resolve(str(mine), "3-path")
    assert config.stage.steps == 11 and config.stage.id_loss_weight == 0.3  # its own value, then toy_fast's
    assert train_main(["--preset", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert f"preset file {tmp_path / 'missing.json'} not found" in capsys.readouterr().err
    assert train_main(["--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown training preset 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
