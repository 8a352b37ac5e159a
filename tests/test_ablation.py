"""Ablation points (eval/ablation.py): each variant's training flags, the summary, failures and bad values."""

import json
from pathlib import Path

import pytest
import torch

from eval.ablation import ID_GROUPS, AblationPoint, main, parse_stages, stage_configs
from eval.ablation_campaign import ABLATIONS, BASELINE, campaign, parse_values, run_ablation, sweep
from eval.ablation_report import ablation_table, format_table, markdown_table, plot_ablation
from eval.ablation_report import main as report_main
from hyperlora.sweep import error_line

STAGE3_GROUPS = ("id_basis", "resampler_core", "arcface_path")  # stage 3 after stage 2: CLIP path frozen


def configs_of(tmp_path, **values):
    return {c.stage.stage: c for c in stage_configs(AblationPoint(**values), tmp_path)}


@pytest.mark.parametrize(
    "stages, expected, has_base, groups_3, steps_3",
    [
        ("1,2,3", [1, 2, 3], True, STAGE3_GROUPS, 10),  # the paper's schedule
        ("2+3", [2, 3], False, STAGE3_GROUPS, 10),  # without stage 1: no Base-LoRA branch
        ("1,3", [1, 3], True, ID_GROUPS, 20),  # ArcFace from scratch after stage 1
        ("3", [3], False, ID_GROUPS, 20),  # ArcFace from scratch, nothing before
    ],
)
def test_each_variant_maps_to_its_stages_and_training_flags(tmp_path, stages, expected, has_base, groups_3, steps_3):
    configs = configs_of(tmp_path, stages=stages, steps=10, reference="self", seed=3)
    assert list(configs) == expected
    assert all(c.model.has_base_lora is has_base for c in configs.values()), "has_base_lora follows stage 1"
    assert configs[3].stage.groups == groups_3 and configs[3].stage.steps == steps_3, (
        "a stage 3 without stage 2 trains the whole ID branch for the steps of stages 2 and 3"
    )
    assert all(c.stage.reference == "self" and c.run.seed == 3 for c in configs.values())
    assert all(c.run.val_every == c.stage.steps for c in configs.values()), "every stage validates at its end"
    assert all(c.stage.warmup_steps <= max(1, c.stage.steps // 10) for c in configs.values())


def test_k_rank_people_and_cache_reach_the_configs(tmp_path):
    default = configs_of(tmp_path)[1]
    assert (default.model.hyper_dim, default.model.rank) == (BASELINE["hyper_dim"], BASELINE["rank"]), (
        "0 means the toy preset's K and rank, which the baseline names"
    )
    configs = configs_of(tmp_path, hyper_dim=8, rank=16, people=7, cache_dir=str(tmp_path / "c"))
    for c in configs.values():
        assert (c.model.hyper_dim, c.model.rank, c.run.num_identities) == (8, 16, 7)
        assert c.run.cache_dir == str(tmp_path / "c") and Path(c.run.pipeline).is_absolute()
    smoke = configs_of(tmp_path, smoke=True, people=2)[3]
    assert (smoke.run.num_identities, smoke.run.images_per_identity, smoke.run.batch_size) == (2, 2, 4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reference", "target"], "reference must be one of ('self', 'other')"),
        (["--stages", "4"], "stages are 1, 2 and 3"),
        (["--stages", "3,2"], "each stage once, in order"),
        (["--stages", "1"], "no ID-LoRA to score"),
        (["--eval-identities", "1"], "eval_identities must be >= 2"),
        (["--rank", "5"], "rank must be even"),
    ],
)
def test_bad_values_fail_before_anything_runs_with_a_clear_message(tmp_path, capsys, argv, message):
    assert main(["--out", str(tmp_path / "p"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists(), "nothing is written"
    with pytest.raises(ValueError):
        parse_stages("1,,3")


@pytest.fixture
def fake_training(monkeypatch):
    """train_schedule and run_evaluation replaced: stage folders with done.json and val.jsonl, two summary rows."""
    calls = []

    def train_schedule(configs, out, **kwargs):
        calls.append((configs, kwargs))
        for c in configs:
            folder = Path(out) / f"stage{c.stage.stage}"
            (folder / "checkpoints").mkdir(parents=True)
            (folder / "done.json").write_text(json.dumps({"seconds_this_session": 1.5, "resumed_from_step": 0}))
            val = [
                {"step": 1, "val_gap": 0.0},
                {"step": 2, "val_gap": 0.01 * c.stage.stage, "val_coefficient_cosine": 0.9},
            ]
            (folder / "val.jsonl").write_text("".join(json.dumps(v) + "\n" for v in val))
        return Path(out) / f"stage{configs[-1].stage.stage}" / "model"

    def run_evaluation(config, out, progress=True):
        calls.append((config, out))
        row = {"clip_t": 0.3, "adherence_mean": 0.7, "face_failure_rate": 0.0, "weights": "w", "id_sim_seed_std": 0.01}
        rows = [
            {"variant": v, "id_sim": x, **row} for v, x in (("hyperlora", 0.5), ("hyperlora_other", 0.2), ("base", 0.1))
        ]
        return {"label": "PLUMBING, NOT RESULTS: test", "rows": rows}

    monkeypatch.setattr("hyperlora.train.loop.train_schedule", train_schedule)
    monkeypatch.setattr("eval.protocol.run_evaluation", run_evaluation)
    monkeypatch.setattr("eval.ablation.reid_scores", lambda point, checkpoint: {"reid_top1": 0.25})
    return calls


def test_the_summary_has_the_settings_training_and_scores(tmp_path, fake_training):
    out = tmp_path / "p"
    assert main(["--out", str(out), "--stages", "3", "--steps", "4", "--eval-identities", "3"]) == 0
    (configs, kwargs), (eval_config, _) = fake_training
    assert [c.stage.stage for c in configs] == [3] and kwargs.get("init") is None, "from scratch: stage 3, no init"
    assert eval_config.methods == "hyperlora,hyperlora_other,base" and eval_config.num_identities == 3
    assert eval_config.checkpoint == str(out / "train" / "stage3" / "hyperlora")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reduced_size"] is True and summary["steps"] == 4 and summary["arcface_from_scratch"] is True
    assert summary["has_base_lora"] is False and summary["settings"]["hyper_dim"] == BASELINE["hyper_dim"]
    assert summary["id_sim"] == 0.5 and summary["id_sim_other_refs"] == 0.2 and summary["id_sim_base"] == 0.1
    assert summary["id_sim_gap"] == pytest.approx(0.3) and summary["clip_t"] == 0.3 and summary["adherence"] == 0.7
    assert summary["label"].startswith("PLUMBING"), "the harness's label is carried"
    assert summary["reid_top1"] == 0.25 and eval_config.id_scale == 2.5, "re-identification; the toy model's weight"
    expected = {"steps": 8, "seconds": 1.5, "resumed_from_step": 0, "train_groups": list(ID_GROUPS), "val_gap": 0.03,
                "val_coefficient_cosine": 0.9}  # fmt: skip
    assert summary["train"]["3"] == expected, "the last validation line's figures"
    assert not (out / "train" / "stage3" / "checkpoints").exists(), "a finished stage's checkpoints are removed"


def test_a_failed_training_reports_its_error_and_leaves_no_summary(tmp_path, monkeypatch, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's

    def broken(*args, **kwargs):
        raise RuntimeError("the pool has no usable face")

    monkeypatch.setattr("hyperlora.train.loop.train_schedule", broken)
    assert main(["--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and not (out / "summary.json").exists()
    assert error_line(err) == "RuntimeError: ablation point failed: the pool has no usable face", "what a sweep records"


def test_an_existing_run_needs_resume(tmp_path, fake_training, capsys):
    out = tmp_path / "p"
    assert main(["--out", str(out), "--stages", "2"]) == 0
    assert main(["--out", str(out), "--stages", "2"]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["--out", str(out), "--stages", "2", "--resume"]) == 0
    assert fake_training[-2][1]["resume"] is True


def test_sweep_fills_the_grid_over_the_baseline(tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr(
        "hyperlora.sweep.run_sweep", lambda command, grid, out, **kw: got.update(command=command, grid=grid, **kw)
    )
    sweep({"rank": [4, 16], "seed": [0, 1]}, tmp_path, jobs=2, steps=5, smoke=True)
    assert got["grid"] == {"rank": ["4", "16"], "seed": ["0", "1"]} and got["jobs"] == 2
    assert got["params"] == {"stages": "1+3", "hyper_dim": "32", "reference": "other", "steps": "5"}
    assert "-m eval.ablation --quiet --resume --out {out}" in got["command"] and got["command"].endswith(" --smoke")
    assert all(
        f"--{k.replace('_', '-')} {{{k}}}" in got["command"] for k in ("rank", "seed", "stages", "hyper_dim", "steps")
    )
    with pytest.raises(ValueError, match="unknown ablation settings"):
        sweep({"seed": [0]}, tmp_path, lr=1e-3)


def test_a_campaign_runs_the_baseline_and_the_chosen_values_each_in_its_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "hyperlora.sweep.run_sweep", lambda command, grid, out, **kw: calls.append((Path(out).name, grid, kw)) or []
    )
    values = parse_values("k=8; stage1=3")
    assert values == {"k": ["8"], "stage1": ["3"]}
    rows = campaign(["k", "rank", "stage1"], tmp_path, seeds=[0, 1], jobs=2, values=values, steps=5)
    assert set(rows) == {"baseline", "k", "rank", "stage1"}
    grids = {name: grid for name, grid, _ in calls}
    assert grids["baseline"] == {"seed": ["0", "1"]} and grids["k"] == {"hyper_dim": ["8"], "seed": ["0", "1"]}
    assert grids["rank"] == {"rank": ["4", "16"], "seed": ["0", "1"]}, "an ablation without chosen values: all"
    assert all(kw["jobs"] == 1 and kw["keep_unfinished"] for _, _, kw in calls), "jobs sweeps at once, a point each"
    with pytest.raises(ValueError, match=r"values \['9'\] must be among \['8', '128'\]"):
        run_ablation("k", tmp_path, seeds=[0], values=["9"])
    with pytest.raises(ValueError, match="unknown ablations"):
        campaign(["k"], tmp_path, seeds=[0], values={"depth": ["2"]})
    with pytest.raises(ValueError, match="write ablation=value"):
        parse_values("k")


def _write_sweep(folder: Path, rows: list[tuple[dict, dict | None]]):
    table = []
    for values, summary in rows:
        name = "_".join(f"{k}={v}" for k, v in values.items())
        table.append({"point": name, **values, "status": "done" if summary else "failed"})
        if summary:
            (folder / name).mkdir(parents=True)
            (folder / name / "summary.json").write_text(json.dumps({"label": "L", **values, **summary}))
    (folder / "summary.json").write_text(json.dumps(table))


def figures(own: float, other: float) -> dict:
    return {
        "id_sim": own,
        "id_sim_other_refs": other,
        "id_sim_gap": own - other,
        "id_sim_base": 0.05,
        "clip_t": 0.3,
        "adherence": None,
    }


def test_the_table_puts_the_baseline_first_and_spreads_over_seeds(tmp_path):
    (tmp_path / "baseline").mkdir()
    _write_sweep(tmp_path / "baseline", [({"seed": 0}, figures(0.5, 0.1)), ({"seed": 1}, figures(0.7, 0.1))])
    (tmp_path / "k").mkdir()
    points = [({"hyper_dim": 8, "seed": 0}, figures(0.2, 0.2)), ({"hyper_dim": 8, "seed": 1}, None),
              ({"hyper_dim": 128, "seed": 0}, None), ({"hyper_dim": 128, "seed": 1}, None)]  # fmt: skip
    _write_sweep(tmp_path / "k", points)
    table = ablation_table("k", tmp_path)
    assert [t["hyper_dim"] for t in table] == ["32", "8", "128"], "the baseline's value first, then the ablation's"
    base, k8, k128 = table
    assert base["id_sim_mean"] == pytest.approx(0.6) and base["id_sim_seed_std"] == pytest.approx(0.1414, abs=1e-4)
    assert (base["id_sim_min"], base["id_sim_max"], base["seeds"], base["failed"]) == (0.5, 0.7, [0, 1], 0)
    assert k8["id_sim_gap_mean"] == 0.0 and k8["id_sim_seed_std"] == 0.0 and k8["failed"] == 1
    assert k128["id_sim_mean"] is None and k128["failed"] == 2 and base["adherence_mean"] is None
    png = plot_ablation("k", table, tmp_path / "k.png", note=" (test)")
    assert png.stat().st_size > 0
    text = format_table("k", table).splitlines()
    assert len(text) == 4 and "0.6000 ± 0.1414" in text[1] and text[3].split()[:3] == ["128", "0", "2"]
    assert set(ABLATIONS) == {"k", "rank", "stage1", "stage3", "reference"}


def _write_harness(point: Path, gap: float, sem: float, above: int, leakage: float):
    (point / "eval").mkdir(parents=True)
    rows = [{"variant": "hyperlora", "leakage_mean": leakage}, {"variant": "base", "leakage_mean": 0.5}]
    control = {"id_sim": {"mean": gap, "sem": sem, "identities_above_zero": above, "n_identities": 8}}
    (point / "eval" / "summary.json").write_text(json.dumps({"rows": rows, "control_gap": control, "timings": []}))


def test_the_report_reads_the_paired_gap_and_survives_being_kept(tmp_path, capsys):
    out = tmp_path / "runs"
    _write_sweep(out / "baseline", [({"seed": 0}, figures(0.3, 0.1) | {"reid_top1": 0.25})])
    _write_sweep(out / "stage1", [({"stages": "3", "seed": 0}, figures(0.2, 0.15)), ({"stages": "3", "seed": 1}, None)])
    _write_harness(out / "baseline" / "seed=0", 0.2, 0.03, 7, 0.08)
    _write_harness(out / "stage1" / "stages=3_seed=0", 0.05, 0.02, 5, 0.2)
    base, without = ablation_table("stage1", out)
    assert (base["id_sim_gap_sem_mean"], base["id_sim_gap_above_zero_mean"], base["leakage_mean"]) == (0.03, 7, 0.08)
    assert (without["leakage_mean"], without["failed"], without["seeds"]) == (0.2, 1, [0])
    assert "+0.200 ± 0.030 (7 above 0)" in markdown_table("stage1", [base, without]).splitlines()[4]
    assert report_main([str(out), "--ablations", "stage1", "--keep", str(tmp_path / "kept")]) == 0
    assert (out / "ablation_stage1.png").stat().st_size > 0 and "| **1+3** | 1 |" in (out / "ablations.md").read_text()
    kept = sorted(str(f.relative_to(tmp_path / "kept")) for f in (tmp_path / "kept").rglob("*.json"))
    assert kept == ["baseline/seed=0/eval/summary.json", "baseline/seed=0/summary.json", "baseline/summary.json",
                    "stage1/stages=3_seed=0/eval/summary.json", "stage1/stages=3_seed=0/summary.json",
                    "stage1/summary.json"]  # fmt: skip
    assert ablation_table("stage1", tmp_path / "kept") == [base, without], "the kept copy draws the same table"
    with pytest.raises(SystemExit):
        report_main([str(out), "--ablations", "nope"])
    assert "unknown ablations ['nope']" in capsys.readouterr().err


def test_a_smoke_point_from_scratch_trains_the_id_branch_and_resumes(tmp_path):
    """The real thing at plumbing size: stage 3 alone from scratch, scored; a rerun with --resume keeps the training."""
    from hyperlora.checkpoint import load_checkpoint

    out = tmp_path / "p"
    argv = ["--out", str(out), "--stages", "3", "--smoke", "--steps", "1", "--people", "2", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train"]["3"]["steps"] == 2 and summary["train"]["3"]["val_gap"] is not None
    assert all(summary[k] is not None for k in ("id_sim", "id_sim_other_refs", "id_sim_gap", "clip_t"))
    assert summary["reid_chance"] == 0.5 and 0 <= summary["reid_top1"] <= 1, "smoke: 2 people re-identified"
    assert summary["label"].startswith("PLUMBING, NOT RESULTS"), "smoke: the harness labels it plumbing"
    model = load_checkpoint(out / "train" / "stage3" / "model")
    up = [p for n, p in model.named_parameters() if n.endswith("id_up_basis")]
    assert up and all(torch.count_nonzero(p) > 0 for p in up), "the ID bases (zero at init) were trained"
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["train"] == summary["train"], "the finished stage is kept"
