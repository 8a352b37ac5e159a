"""Training previews: log reading, loss plots, the held-out validation grid, the notebooks' stage configs."""

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from hyperlora.train.config import resolve
from hyperlora.train.loop import train_stage
from hyperlora.train.preview import (
    CELL_INCHES,
    DPI,
    compare_schedules,
    plot_training,
    read_log,
    run_folder_of,
    schedule_curve,
    stage_configs,
    summarize,
    validation_grid,
)


def _fake_run(folder, *, val=True):
    folder.mkdir(parents=True)
    lines = [{"step": 1, "loss": 0.5, "loss_a": 0.6, "loss_b": 0.1, "lr": 1e-4},
             {"step": 2, "loss": 0.4, "loss_a": 0.5, "lr": 1e-4}]  # step 2 drew no case (b)
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if val:
        (folder / "val.jsonl").write_text(json.dumps({"step": 2, "val_loss_right": 0.3, "val_loss_shuffled": 0.35,
                                                      "val_gap": 0.05}) + "\n")  # fmt: skip
    return folder


def test_read_log_aligns_missing_cases_and_keeps_val_apart(tmp_path):
    log = read_log(_fake_run(tmp_path / "stage2"))
    assert log["step"] == [1, 2] and log["loss"] == [0.5, 0.4]
    assert log["loss_b"][0] == 0.1 and math.isnan(log["loss_b"][1]), "a case missing from a line must read as NaN"
    assert log["val_step"] == [2] and log["val_gap"] == [0.05]
    assert "val_step" not in read_log(_fake_run(tmp_path / "noval", val=False)), "no val.jsonl: no val keys"
    with pytest.raises(FileNotFoundError, match="log.jsonl"):
        read_log(tmp_path)


def test_plot_training_and_summary_of_fake_runs(tmp_path):
    folders = {"stage 1": _fake_run(tmp_path / "stage1", val=False), "stage 2": _fake_run(tmp_path / "stage2")}
    png = plot_training(folders, tmp_path / "training.png")
    assert Image.open(png).size == (1000, 640), "10 x 3.2 inches per stage row at 100 dpi"
    summary = summarize(folders["stage 2"])
    assert summary["final"] == {"step": 2, "loss": 0.4, "loss_a": 0.5, "loss_b": None} and summary["done"] is None
    assert summary["validation"]["val_gap"] == 0.05
    assert run_folder_of(folders["stage 2"] / "model") == folders["stage 2"] and run_folder_of(tmp_path) is None


def _fake_stage(folder, stage: int, steps: int, gaps: list[float]):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"stage": {"stage": stage, "steps": steps}}))
    lines = [{"step": 500 * (i + 1), "val_gap": g, "val_coefficient_cosine": 1 - g} for i, g in enumerate(gaps)]
    (folder / "val.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_schedule_curve_puts_later_stages_after_earlier_ones_and_the_figure_has_a_panel_per_measure(tmp_path):
    s2 = _fake_stage(tmp_path / "s2", 2, 1000, [0.0, 0.1])
    s3 = _fake_stage(tmp_path / "s3", 3, 1500, [0.2, 0.3, 0.4])
    curve = schedule_curve([s2, s3])
    assert curve["step"] == [500, 1000, 1500, 2000, 2500] and curve["stage"] == [2, 2, 3, 3, 3]
    assert curve["starts"] == [1000] and curve["val_gap"][2] == 0.2
    assert curve["val_coefficient_cosine"][-1] == pytest.approx(0.6)
    scratch = _fake_stage(tmp_path / "scratch", 3, 2500, [0.1] * 5)
    two = compare_schedules({"CLIP first": [s2, s3], "scratch": [scratch]}, tmp_path / "a.png")
    three = compare_schedules({"CLIP first": [s2, s3], "scratch": [scratch]}, tmp_path / "b.png",
                              id_similarity={"scratch": [(2500, 0.2), (1000, 0.1)]})  # fmt: skip
    assert Image.open(two).width < Image.open(three).width, "ID similarity adds a third panel"


def test_stage_configs_smoke_and_full():
    smoke = stage_configs(3, smoke=True, seed=5)
    assert [c.stage.stage for c in smoke] == [1, 2, 3] and all(c.stage.steps == 2 and c.run.seed == 5 for c in smoke)
    assert smoke[0].run.num_identities == 3
    full = stage_configs(2, smoke=False, steps=50)
    assert [c.stage.steps for c in full] == [resolve("toy", 1).stage.steps, 50] and full[1].stage.warmup_steps == 5
    assert [c.stage.stage for c in stage_configs(2, smoke=False, earlier=False)] == [2]
    assert full[0].run.pipeline == str(Path("data/toy/sdxl").resolve()), "toy paths absolute (notebooks run elsewhere)"


def test_validation_grid_has_a_column_per_checkpoint_and_a_similarity_per_cell(tmp_path):
    run = {"num_identities": 3, "images_per_identity": 2, "batch_size": 4, "val_every": 0, "threads": 1}
    config = resolve("toy", 2, run=run, stage_overrides={"steps": 2, "warmup_steps": 1})
    model = train_stage(config, tmp_path / "stage2", progress=False)
    checkpoints = [("2 steps", model), ("2 steps fp16", tmp_path / "stage2" / "hyperlora")]
    png = validation_grid(checkpoints, num_people=2, steps=2, smoke=True, out_png=tmp_path / "grid.png")
    columns, rows = 2 + len(checkpoints), 2
    width, height = Image.open(png).size
    assert width == round(columns * CELL_INCHES * DPI) and height > rows * CELL_INCHES * DPI
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["columns"] == ["reference", "base model", "2 steps", "2 steps fp16"]
    assert all(len(record["similarity"][c]) == rows for c in record["columns"]), "one similarity per cell"
    assert record["similarity"]["reference"] == pytest.approx([1.0, 1.0]), "the toy detector finds every render's face"


def test_plot_training_draws_the_identity_terms_on_a_second_axis_where_they_ran(tmp_path, monkeypatch):
    from hyperlora.train import preview

    plain = _fake_run(tmp_path / "stage3")
    path = _fake_run(tmp_path / "stage3-path")
    lines = [{"step": 1, "loss": 0.5, "loss_a": 0.6, "loss_id": 0.8},
             {"step": 2, "loss": 0.4, "loss_a": 0.5, "loss_id": 0.7, "loss_decouple": 0.2}]  # fmt: skip
    (path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = []
    monkeypatch.setattr(preview.plt, "close", figures.append)
    plot_training({"stage 3": plain, "stage 3-path": path}, tmp_path / "training.png")
    labels = [[line.get_label() for line in ax.get_lines()] for ax in figures[0].axes]
    identity_axes = [found for found in labels if "loss_id (1 - cosine)" in found]
    assert identity_axes == [["loss_id (1 - cosine)", "loss_decouple (1 - cosine)"]], "one twin axis, the path run's"
