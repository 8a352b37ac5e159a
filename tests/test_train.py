"""Training: the three stages' plumbing on the shipped toy models at a tiny size (seconds each)."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hyperlora.checkpoint import load_checkpoint
from hyperlora.train.__main__ import main as train_main
from hyperlora.train.__main__ import parser
from hyperlora.train.config import PARAM_GROUPS, StageConfig, resolve
from hyperlora.train.loop import build_model, load_base_pipeline, train_schedule, train_stage
from hyperlora.train.losses import LoRAGenerator, base_coefficient_table, stage_loss
from hyperlora.train.params import group_of, optimizer_groups, select_trainable

# A tiny pool (3 people x 2 looks) and 2 steps per stage: plumbing, not results.
TINY_RUN = {"num_identities": 3, "images_per_identity": 2, "batch_size": 4, "val_identities": 2, "val_every": 2,
            "checkpoint_every": 2, "log_every": 1, "threads": 1}  # fmt: skip


def tiny(stage: int, **stage_overrides):
    return resolve("toy", stage, run=TINY_RUN, stage_overrides={"steps": 2, "warmup_steps": 1, **stage_overrides})


def _state(folder):
    return {**{f"lora_modules.{k}": v for k, v in load_file(str(folder / "hyper_lora_modules.safetensors")).items()},
            **{f"resampler.{k}": v for k, v in load_file(str(folder / "resampler.safetensors")).items()},
            **{f"id_projector.{k}": v for k, v in load_file(str(folder / "id_projector.safetensors")).items()},
            **{f"base_resampler.{k}": v for k, v in load_file(str(folder / "base_resampler.safetensors")).items()}}  # fmt: skip


@pytest.fixture(scope="module")
def schedule(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    train_schedule([tiny(s) for s in (1, 2, 3)], out, progress=False)
    return out


@pytest.fixture(scope="module")
def unet():
    return load_base_pipeline("data/toy/sdxl", "toy").unet.requires_grad_(False)


def test_unknown_keys_raise_and_presets_hold_only_differences():
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        resolve("toy", 1, run={"batchsize": 4})
    with pytest.raises(ValueError, match="unknown training preset"):
        resolve("nope", 1)
    with pytest.raises(ValueError, match="case_probs"):
        StageConfig(stage=2, case_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="--data"):
        resolve("sdxl", 1)
    config = resolve("toy", 2)
    assert config.stage.stage == 2 and config.stage.groups == ("id_basis", "resampler_core", "clip_path")
    assert config.model.dim == 192 and config.model.has_base_lora


def test_cli_flags_come_from_the_dataclass_fields():
    args = parser().parse_args(["--stages", "1,2", "--out", "x", "--hyper-dim", "8", "--case-probs", "1,0,0",
                                "--snr-gamma", "none", "--batch-size", "2"])  # fmt: skip
    assert args.stages == ["1", "2"]
    assert vars(args)["model.hyper_dim"] == 8 and vars(args)["stage.case_probs"] == (1.0, 0.0, 0.0)
    assert vars(args)["run.snr_gamma"] is None and vars(args)["run.batch_size"] == 2


def test_every_parameter_is_in_exactly_one_group(unet):
    model = build_model(tiny(1), unet, None)
    groups = {group_of(name) for name, _ in model.named_parameters()}
    assert groups == set(PARAM_GROUPS)
    params = select_trainable(model, ("arcface_path",))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(params) == len(names) and all(n.startswith(("id_projector", "resampler.proj_in.", "resampler.layers"))
                                             and "attn3" not in n for n in names)  # fmt: skip


def test_a_basis_lr_scale_gives_the_basis_banks_their_own_learning_rate(unet):
    model = build_model(tiny(1), unet, None)
    params = select_trainable(model, ("id_basis", "resampler_core"))
    assert optimizer_groups(model, params, 1e-3) == [{"params": params, "lr": 1e-3}], "scale 1: one group, as before"
    rest, basis = optimizer_groups(model, params, 1e-3, 5.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert basis["lr"] == pytest.approx(5e-3) and rest["lr"] == 1e-3
    assert all(names[id(p)].endswith("id_down_basis") or names[id(p)].endswith("id_up_basis") for p in basis["params"])
    assert all(names[id(p)].startswith("resampler.") for p in rest["params"])
    assert len(rest["params"]) + len(basis["params"]) == len(params)
    only_bases = optimizer_groups(model, select_trainable(model, ("id_basis",)), 1e-3, 5.0)
    assert len(only_bases) == 1 and only_bases[0]["lr"] == pytest.approx(5e-3), "no empty group"
    with pytest.raises(ValueError, match="basis_lr_scale must be > 0"):
        StageConfig(basis_lr_scale=0)


def test_each_stage_writes_a_checkpoint_that_reloads_in_the_official_format(schedule, unet):
    for stage in (1, 2, 3):
        folder = schedule / f"stage{stage}"
        model = load_checkpoint(folder / "hyperlora", unet=unet)
        assert next(model.parameters()).dtype == torch.float16
        assert json.loads((folder / "config.json").read_text())["stage"]["stage"] == stage
        assert (folder / "done.json").is_file() and (folder / "log.jsonl").read_text().count("\n") == 2
        val = json.loads((folder / "val.jsonl").read_text().split("\n")[0])
        assert {"val_loss_right", "val_loss_shuffled", "val_gap"} <= set(val)
        assert -1.0 <= val["val_coefficient_cosine"] <= 1.0


def test_a_stage_started_from_a_shipped_fp16_checkpoint_trains_in_float32(schedule, unet, tmp_path):
    shipped = schedule / "stage3" / "hyperlora"  # fp16, as data/toy/hyperlora
    assert {p.dtype for p in build_model(tiny(3), unet, shipped).parameters()} == {torch.float32}
    train_stage(tiny(3), tmp_path / "branch", init=shipped, cache_dir=schedule / "cache", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "branch" / "log.jsonl").read_text().splitlines()]
    assert lines and all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)


def test_a_stage_changes_only_the_parameters_it_owns(schedule, unet):
    init = build_model(tiny(1), unet, None)  # the seeded fresh model stage 1 started from
    before = {n: p.detach().clone() for n, p in init.named_parameters()}
    after = {1: _state(schedule / "stage1" / "model"), 2: _state(schedule / "stage2" / "model"),
             3: _state(schedule / "stage3" / "model")}  # fmt: skip
    owned = {1: {"base"}, 2: {"id_basis", "resampler_core", "clip_path"}, 3: {"id_basis", "resampler_core", "arcface_path"}}
    previous = {n: before[n] for n in before}
    for stage in (1, 2, 3):
        changed = {group_of(n) for n, v in after[stage].items() if not torch.equal(v, previous[n])}
        assert changed and changed <= owned[stage], f"stage {stage} changed {changed}, owns {owned[stage]}"
        previous = after[stage]


def test_case_b_loss_is_zero_when_the_id_lora_is_zero(unet, tmp_path):
    from diffusers import DDPMScheduler

    from hyperlora.train.data import sample_batch
    from hyperlora.train.loop import load_training_sets

    config = tiny(2, case_probs=(0.0, 1.0, 0.0))
    pipe = load_base_pipeline(config.run.pipeline, "toy")
    data, _ = load_training_sets(dataclasses.replace(config, run=dataclasses.replace(config.run, val_every=0)), pipe,
                                 tmp_path, progress=False)  # fmt: skip
    model = build_model(config, pipe.unet, None)  # fresh: zero up bases, so a zero ID-LoRA
    batch = sample_batch(data, data.others(), config.stage, config.run, torch.Generator().manual_seed(0))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loss, stats = stage_loss(LoRAGenerator(model), pipe.unet, scheduler, batch, config.stage, snr_gamma=None,
                             rng=torch.Generator().manual_seed(1), has_base=True)  # fmt: skip
    assert set(stats) == {"loss_b"} and float(loss) < 1e-10, "case (b) with a zero ID-LoRA must match the base model"
    with torch.no_grad():
        model.randomize_up_bases(0.05)
    loss, _ = stage_loss(LoRAGenerator(model), pipe.unet, scheduler, batch, config.stage, snr_gamma=None,
                         rng=torch.Generator().manual_seed(1), has_base=True)  # fmt: skip
    assert float(loss) > 1e-6, "a non-zero ID-LoRA must be penalised in case (b)"


def test_the_base_coefficient_table_gives_the_loss_the_base_resampler_gives(tmp_path, monkeypatch):
    from hyperlora.train.data import sample_batch
    from hyperlora.train.loop import setup_stage

    config = tiny(2, case_probs=(0.5, 0.0, 0.5))  # cases (a) and (c): both use the Base-LoRA
    trainer = setup_stage(config, cache_dir=tmp_path, progress=False)
    assert setup_stage(tiny(1), cache_dir=tmp_path, progress=False).base_table is None, "stage 1 trains the Base"
    with monkeypatch.context() as patch:
        patch.setattr("hyperlora.train.loop.BASE_TABLE_MAX_BYTES", 1000)  # a table over the cap: per batch instead
        assert setup_stage(config, cache_dir=tmp_path, progress=False).base_table is None
    model = trainer.accelerator.unwrap_model(trainer.module).hyperlora
    with torch.no_grad():
        model.randomize_up_bases(0.05)  # non-zero ID- and Base-LoRAs
    table = base_coefficient_table(model, trainer.data.clip_base, batch_size=2)
    assert table.shape[0] == len(trainer.data) and torch.allclose(trainer.base_table, table, atol=1e-6)
    batch = sample_batch(trainer.data, trainer.others, config.stage, config.run, torch.Generator().manual_seed(0))

    def loss(**extra):
        value, _ = stage_loss(LoRAGenerator(model), trainer.unet, trainer.scheduler, {**batch, **extra}, config.stage,
                              snr_gamma=None, rng=torch.Generator().manual_seed(1), has_base=True)  # fmt: skip
        return float(value)

    assert loss(base_coefficients=table[batch["index"]]) == pytest.approx(loss(), rel=1e-5)
    assert loss(base_coefficients=table[batch["index"].roll(1)]) != pytest.approx(loss(), rel=1e-3)


def test_a_run_killed_and_resumed_ends_with_bit_identical_weights(schedule, tmp_path):
    config = tiny(2, steps=4)
    init = schedule / "stage1" / "model"
    whole = train_stage(config, tmp_path / "whole", init=init, cache_dir=schedule / "cache", progress=False)
    resumed = tmp_path / "resumed"
    train_stage(config, resumed, init=init, cache_dir=schedule / "cache", progress=False)
    # as if killed right after the step-2 checkpoint: later state gone
    for name in ("model", "hyperlora", "checkpoints/step-4", "done.json"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileExistsError, match="--resume"):
        train_stage(config, resumed, init=init, cache_dir=schedule / "cache", progress=False)
    train_stage(config, resumed, init=init, resume=True, cache_dir=schedule / "cache", progress=False)
    a, b = _state(whole), _state(resumed / "model")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run's"
    assert json.loads((resumed / "done.json").read_text())["resumed_from_step"] == 2
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], f"a resumed run's log holds each step once, got {steps}"
    done = json.loads((resumed / "done.json").read_text())
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    images = config.run.batch_size  # log_every 1: one step of images per line
    assert done["seconds"] == pytest.approx(sum(images / line["images_per_s"] for line in log), abs=0.05), (
        "a resumed stage's seconds count the killed session's steps too"
    )
    assert done["seconds"] > sum(images / line["images_per_s"] for line in log[2:]), "more than the last session's"


def test_two_process_accelerate_run_keeps_the_processes_weights_identical(schedule, tmp_path):
    out = tmp_path / "ddp"
    # accelerate's data-parallel launcher (torchrun); ACCELERATE_USE_CPU makes the processes use gloo on the CPU
    with socket.socket() as probe:  # a free port: the default 29500 may be held (seen once: EADDRINUSE)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "-m", "hyperlora.train", "--stage", "2", "--init", str(schedule / "stage1" / "model"), "--out", str(out),
               "--steps", "2", "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [json.loads(p.read_text())["weights_sha256"] for p in sorted((out / "processes").glob("rank*.json"))]
    assert len(digests) == 2 and digests[0] == digests[1], digests
    assert json.loads((out / "config.json").read_text())["num_processes"] == 2


def test_cli_runs_a_stage(schedule, tmp_path, capsys):
    code = train_main(["--stage", "3", "--init", str(schedule / "stage2" / "model"), "--out", str(tmp_path / "cli"),
                       "--steps", "1", "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items()])  # fmt: skip
    assert code == 0 and "trained hypernetwork" in capsys.readouterr().out


def test_a_batch_groups_looks_of_one_person_behind_one_reference(schedule):
    from hyperlora.train.data import TrainingSet, sample_batch

    data, _ = TrainingSet.load(next((schedule / "cache").glob("train-*/training_set.safetensors")))
    config = tiny(2, targets_per_reference=2)
    batch = sample_batch(data, data.others(), config.stage, config.run, torch.Generator().manual_seed(3))
    assert len(batch["clip"]) == len(batch["arcface"]) == 2 and len(batch["latents"]) == 4
    assert batch["group"].tolist() == [0, 0, 1, 1]
    people = data.person[batch["index"]].view(2, 2)
    assert (people[:, 0] == people[:, 1]).all() and (data.person[batch["reference"]] == people[:, 0]).all()
    with pytest.raises(ValueError, match="multiple of targets_per_reference"):
        sample_batch(data, data.others(), tiny(2, targets_per_reference=3).stage, config.run, torch.Generator())


def test_coefficient_cosine_is_one_for_one_generic_lora_and_lower_for_distinct_people():
    from hyperlora.train.losses import coefficient_cosine

    same = torch.ones(4, 3, 8)
    assert coefficient_cosine(same, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0)
    distinct = torch.nn.functional.normalize(torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert coefficient_cosine(distinct, torch.tensor([0, 1, 2, 3])) < 0.9


def test_ship_copies_the_last_stage_and_writes_a_card_of_every_stage(schedule, tmp_path):
    from hyperlora.train.ship import main as ship_main
    from hyperlora.train.ship import ship

    out = ship([schedule], tmp_path / "shipped")
    card = json.loads((out / "model_card.json").read_text())
    assert [s["stage"] for s in card["stages"]] == [1, 2, 3]
    assert [s["stage"] for s in card["figures"]["stages"]] == [1, 2, 3]
    assert card["train_seconds"] == pytest.approx(sum(s["seconds"] for s in card["stages"]), abs=0.05)
    assert "val_gap" in card["figures"]["stages"][-1]  # the last validation of stage 3
    shipped, trained = _state(out), _state(schedule / "stage3" / "hyperlora")
    assert shipped.keys() == trained.keys() and all(torch.equal(shipped[k], trained[k]) for k in shipped)
    load_checkpoint(out)
    assert ship_main([str(schedule), "--out", str(out)]) == 2  # exists: refused without --overwrite
    assert ship_main([str(schedule), "--out", str(tmp_path / "small"), "--max-mb", "0.001"]) == 2
    assert not (tmp_path / "small").exists()
    with pytest.raises(FileNotFoundError, match="not a finished stage"):
        ship([tmp_path], tmp_path / "none")


def test_reevaluate_replaces_a_shipped_cards_evaluation_and_keeps_the_one_before(schedule, tmp_path):
    from hyperlora.train.ship import main as ship_main
    from hyperlora.train.ship import reevaluate, ship

    def evaluation(name, label, id_scale):
        folder = tmp_path / name
        folder.mkdir()
        rows = [{"variant": "hyperlora", "id_sim": 0.2, "label": label}]
        (folder / "summary.json").write_text(json.dumps({"label": label, "rows": rows}))
        (folder / "config.json").write_text(json.dumps({"config": {"id_scale": id_scale}}))
        return folder

    out = ship([schedule], tmp_path / "shipped", evaluation=evaluation("old", "PLUMBING, NOT RESULTS: old judge", 2.5))
    before = json.loads((out / "model_card.json").read_text())
    weights = _state(out)
    assert ship_main([str(out), "--reevaluate", "--eval", str(evaluation("new", "new judge", 2.5))]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["figures"]["evaluation"]["label"] == "new judge" and card["summary"].endswith("Evaluation label: new judge")
    assert [e["label"] for e in card["figures"]["earlier_evaluations"]] == ["PLUMBING, NOT RESULTS: old judge"]
    assert card["stages"] == before["stages"] and card["figures"]["stages"] == before["figures"]["stages"]
    assert card["shipped_by"]["command"] == before["command"] and "--reevaluate" in card["command"]
    assert all(torch.equal(weights[k], v) for k, v in _state(out).items()), "the weights are not touched"
    readme = (out / "README.md").read_text()  # the ship's commit and date stay the card's; the re-evaluation is added
    assert f"- git commit: {before['git_commit']}" in readme and before["created_utc"] in readme
    assert "- re-evaluated at git commit" in readme and f"Shipped by `{' '.join(before['command'])}`" in readme
    reevaluate(out, tmp_path / "new")  # twice: both earlier evaluations kept, the first ship command too
    card = json.loads((out / "model_card.json").read_text())
    assert len(card["figures"]["earlier_evaluations"]) == 2 and card["shipped_by"]["command"] == before["command"]
    with pytest.raises(ValueError, match="measured at ID weight 1.0; .* is used at 2.5"):
        reevaluate(out, evaluation("other_weight", "x", 1.0))
    with pytest.raises(ValueError, match="not a shipped model folder"):
        reevaluate(schedule / "stage3", tmp_path / "new")
    with pytest.raises(SystemExit):
        ship_main([str(out), "--reevaluate"])  # no --eval


def test_ship_takes_a_snapshot_of_a_stage_stopped_early_as_the_last_stage(schedule, tmp_path):
    from hyperlora.train.ship import ship
    from hyperlora.train.snapshot import snapshot

    snap = snapshot(schedule / "stage3", 2, tmp_path / "run" / "snapshots" / "step-2")
    run = snap.parents[1]  # a copy of stage 3's run folder without done.json: a stage that was stopped
    for name in ("config.json", "log.jsonl", "val.jsonl"):
        shutil.copy(schedule / "stage3" / name, run / name)
    out = ship([schedule / "stage1", schedule / "stage2", snap], tmp_path / "shipped")
    card = json.loads((out / "model_card.json").read_text())
    assert [s["stage"] for s in card["stages"]] == [1, 2, 3] and card["stages"][-1]["snapshot"] == str(snap)
    assert card["stages"][-1]["steps"] == 2 and card["stages"][-1]["seconds"] > 0
    shipped, snapped = _state(out), _state(snap)
    assert all(torch.equal(shipped[k], snapped[k]) for k in snapped)
    with pytest.raises(ValueError, match="only be the last stage"):
        ship([snap, schedule / "stage3"], tmp_path / "wrong")


def test_ship_carries_a_shipped_models_stages_into_the_card_of_a_continuation(schedule, tmp_path):
    from hyperlora.train.ship import ship

    parent = ship([schedule / "stage1", schedule / "stage2"], tmp_path / "parent")
    out = ship([parent, schedule / "stage3"], parent, overwrite=True)  # continued from it, shipped in its place
    card = json.loads((out / "model_card.json").read_text())
    assert [s["stage"] for s in card["stages"]] == [1, 2, 3]
    assert [s.get("carried_from") for s in card["stages"]] == [str(parent), str(parent), None]
    assert card["figures"]["stages"][-1]["steps"] == card["stages"][-1]["steps"]
    shipped, last = _state(out), _state(schedule / "stage3" / "hyperlora")
    assert all(torch.equal(shipped[k], last[k]) for k in last), "the weights are the continuation's"
    with pytest.raises(ValueError, match="can only come first"):
        ship([schedule / "stage3", out], tmp_path / "wrong")
    with pytest.raises(ValueError, match="can only come first"):
        ship([out], tmp_path / "alone")


def test_ship_records_the_id_weight_its_evaluation_measured_and_every_default_uses_it(schedule, tmp_path):
    from eval.protocol import EvalConfig
    from hyperlora.checkpoint import RELEASE_ID_WEIGHT, CheckpointError, recommended_id_weight
    from hyperlora.train.ship import ship

    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "summary.json").write_text(json.dumps({"label": "", "rows": [{"variant": "hyperlora", "id_sim": 0.2}]}))
    (evaluation / "config.json").write_text(json.dumps({"config": {"id_scale": 2.5}}))
    assert recommended_id_weight(schedule / "stage3" / "hyperlora") == RELEASE_ID_WEIGHT  # none recorded
    out = ship([schedule], tmp_path / "shipped", evaluation=evaluation)
    assert recommended_id_weight(out) == 2.5 and "ID-LoRA weight 2.5 " in (out / "README.md").read_text()
    assert json.loads((out / "model_card.json").read_text())["figures"]["evaluation"]["id_scale"] == 2.5
    assert EvalConfig(checkpoint=str(out)).id_scale == 2.5 and EvalConfig(checkpoint=str(out), id_scale=1.0).id_scale == 1.0
    assert EvalConfig().id_scale == RELEASE_ID_WEIGHT  # no checkpoint: the release's weight
    load_checkpoint(out)  # the extra key does not disturb loading
    with pytest.raises(ValueError, match="measured at ID weight 2.5"):
        ship([schedule], tmp_path / "mismatch", evaluation=evaluation, id_weight=0.85)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"id_weight": "high"}))
    with pytest.raises(CheckpointError, match="id_weight must be a positive number"):
        recommended_id_weight(out)


def test_the_pool_keeps_each_face_box_and_the_face_weights_weigh_inside_it(schedule):
    from hyperlora.toy.identity import split_identities
    from hyperlora.toy.render import render_sample
    from hyperlora.train.data import TrainingSet, sample_batch
    from hyperlora.train.losses import face_weights

    data, _ = TrainingSet.load(next((schedule / "cache").glob("train-*/training_set.safetensors")))
    truth = render_sample(split_identities("train")[0], 0, tiny(2).run.data_seed)
    size = truth.image.shape[0]
    assert torch.allclose(data.face_box[0] * size, torch.tensor(truth.box, dtype=torch.float32), atol=3.0)
    config = tiny(2, face_loss_weight=4.0)
    batch = sample_batch(data, data.others(), config.stage, config.run, torch.Generator().manual_seed(0))
    weights = face_weights(batch, (16, 16), 4.0)
    assert weights.shape == (4, 16, 16) and torch.allclose(weights.mean((1, 2)), torch.ones(4))
    assert (weights.amax((1, 2)) / weights.amin((1, 2)) - 5.0).abs().max() < 1e-5  # 1 + 4 inside, 1 outside
    x1, y1, x2, y2 = (batch["face_box"][0] * 16).tolist()
    inside = weights[0, int((y1 + y2) / 2), int((x1 + x2) / 2)]
    assert inside == weights[0].max() and weights[0, 0, 0] == weights[0].min()
    assert face_weights(batch, (16, 16), 0.0) == 1.0
    with pytest.raises(ValueError, match="face boxes"):
        face_weights({k: v for k, v in batch.items() if k != "face_box"}, (16, 16), 4.0)
    with pytest.raises(ValueError, match="face_loss_weight"):
        StageConfig(stage=2, face_loss_weight=-1.0)


def test_a_snapshot_of_the_last_checkpoint_equals_the_exported_model_and_a_missing_step_is_named(schedule, tmp_path):
    from hyperlora.train.snapshot import main, snapshot

    out = snapshot(schedule / "stage2", 2, tmp_path / "snap", dtype="float32")
    ours, theirs = _state(out), _state(schedule / "stage2" / "model")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert main([str(schedule / "stage2"), "--step", "7", "--out", str(tmp_path / "x")]) == 2
    with pytest.raises(FileNotFoundError, match="kept: \\['step-2'\\]"):
        snapshot(schedule / "stage2", 7)


def test_max_timestep_draws_only_lower_noise_steps_and_zero_keeps_every_draw():
    from diffusers import DDPMScheduler

    from hyperlora.diffusion import noisy_inputs
    from hyperlora.train.config import StageConfig

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(256, 4, 2, 2)
    _, every, _ = noisy_inputs(scheduler, latents, torch.Generator().manual_seed(0))
    _, same, _ = noisy_inputs(scheduler, latents, torch.Generator().manual_seed(0), 0)
    _, low, _ = noisy_inputs(scheduler, latents, torch.Generator().manual_seed(0), 300)
    assert torch.equal(every, same), "max_timestep 0 must keep the old draws (resumed runs stay bit-identical)"
    assert int(every.max()) >= 300 and int(low.max()) < 300 and len(set(low.tolist())) > 100
    with pytest.raises(ValueError, match="max_timestep"):
        noisy_inputs(scheduler, latents, torch.Generator(), 1001)
    with pytest.raises(ValueError, match="max_timestep"):
        StageConfig(max_timestep=-1)
