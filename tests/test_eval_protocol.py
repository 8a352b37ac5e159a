"""The evaluation protocol end to end on smoke-size toy models: files, rerun identity, baselines, labels."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eval.metrics import id_similarity
from eval.protocol import EvalConfig, ToyWorld, build_smoke_toy, eval_seed, format_table, run_evaluation
from eval.run import config_from_args, parser
from hyperlora.conditioning import backends
from hyperlora.conditioning.faces import Face, FaceAnalyzer
from hyperlora.toy.identity import LOOK_ATTRIBUTES
from hyperlora.toy.render import render, sample_look

PLUMBING = "PLUMBING, NOT RESULTS"


class CentreFaceAnalyzer(FaceAnalyzer):
    """A stand-in face backend for untrained toy detectors: one face in the image centre, embedded from its pixels."""

    name, embedding_dim = "centre", 16
    search_description = "a fixed box in the image centre"

    def detect(self, image):
        w, h = image.size
        kps = np.array([[0.4, 0.4], [0.6, 0.4], [0.5, 0.5], [0.42, 0.6], [0.58, 0.6]]) * [w, h]
        return [Face(bbox=np.array([0.25 * w, 0.2 * h, 0.75 * w, 0.75 * h]), score=1.0, kps=kps)]

    def embed(self, image, face):
        pixels = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float64).ravel()[:16] + 1.0
        return pixels / np.linalg.norm(pixels)


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return build_smoke_toy(tmp_path_factory.mktemp("toy"))


def smoke_config(toy_dir, **overrides) -> EvalConfig:
    values = dict(methods="hyperlora,base,renders,dreambooth", num_identities=1, num_references=2, seeds_per_prompt=2,
                  prompts="0,1", steps=2, toy_dir=str(toy_dir), dreambooth_steps="1,2", det_threshold=0.0,
                  min_face_size=0.0, smoke=True)  # fmt: skip
    return EvalConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def first_run(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_a")
    return out, run_evaluation(smoke_config(toy_dir), out)


def read_records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_run_writes_every_file_and_labels_every_row(first_run):
    out, summary = first_run
    for name in ("config.json", "records.jsonl", "summary.json", "summary.csv", "grid_hyperlora.png",
                 "grid_renders.png", "grid_dreambooth_2.png"):  # fmt: skip
        assert (out / name).is_file(), f"{name} missing"
    config = json.loads((out / "config.json").read_text())
    assert config["git_commit"] and "command" in config and config["config"]["smoke"] is True
    variants = [row["variant"] for row in summary["rows"]]
    assert variants == ["hyperlora", "base", "renders", "dreambooth@1", "dreambooth@2"]
    for row in summary["rows"]:
        assert row["label"].startswith(PLUMBING), f"{row['variant']}: smoke figures must say they are plumbing"
        assert row["weights"], row["variant"]
    assert "UNTRAINED" in summary["rows"][0]["weights"]
    assert summary["rows"][0]["trait_match"] is None and "train-traits" in summary["rows"][0]["not_available"]["trait_match"]
    csv_text = (out / "summary.csv").read_text()
    assert csv_text.count(PLUMBING) == len(variants) and "UNTRAINED" in csv_text
    assert len(read_records(out)) == len(variants) * 2 * 2  # 1 identity x 2 prompts x 2 seeds
    assert all(r["face_texture"] >= 0 for r in read_records(out)), "every image's face is read, found or not"
    assert all(row["face_texture"] >= 0 for row in summary["rows"])
    assert len(format_table(summary["rows"]).splitlines()) == 1 + len(variants)


def test_rerun_gives_identical_records(first_run, toy_dir, tmp_path):
    out, _ = first_run
    run_evaluation(smoke_config(toy_dir), tmp_path)

    def stable(records):  # wall times differ run to run; everything else must not
        return [{k: v for k, v in r.items() if not k.endswith("_ms")} for r in records]

    assert stable(read_records(tmp_path)) == stable(read_records(out)), "the dedicated generators must repeat exactly"
    for record in read_records(out):
        a, b = (np.asarray(Image.open(d / record["image"])) for d in (out, tmp_path))
        assert np.array_equal(a, b), record["image"]


def test_renders_baseline_scores_real_renders(first_run, toy_dir):
    out, summary = first_run
    config = smoke_config(toy_dir)
    world = ToyWorld(config)
    identity = world.identity(0)
    rows = [r for r in read_records(out) if r["variant"] == "renders"]
    assert {r["source"] for r in rows} == {"render"}
    for r in rows:
        look = sample_look(np.random.default_rng(r["eval_seed"]), **r["prompt_attributes"])
        expected = render(r["identity"], look, config.size).image
        assert np.array_equal(np.asarray(Image.open(out / r["image"])), expected), "renders are the renderer's images"
        embedding = world.face_judge(expected[None])[0]
        assert r["id_sim"] == pytest.approx(id_similarity(identity["face_embedding"], [embedding])["per_image"][0])
    assert "clip_i_disruption" not in rows[0], "renders have no same-seed no-LoRA image to compare with"
    row = next(row for row in summary["rows"] if row["variant"] == "renders")
    assert row["id_sim"] == pytest.approx(np.mean([r["id_sim"] for r in rows]))


def test_dreambooth_records_wall_time_per_step_count(first_run):
    _, summary = first_run
    rows = [row for row in summary["rows"] if row["method"] == "dreambooth"]
    assert [row["dreambooth_steps"] for row in rows] == [1, 2]
    assert 0 < rows[0]["personalize_train_ms"] < rows[1]["personalize_train_ms"], "time is cumulative over steps"
    timings = [t for t in summary["timings"] if t["variant"].startswith("dreambooth")]
    assert all(t["train_ms"] > 0 for t in timings)


def test_eval_seed_and_cli_flags():
    assert eval_seed(0, 1, 2, 3) == eval_seed(0, 1, 2, 3) != eval_seed(0, 1, 2, 4)
    args = parser().parse_args(["--out", "x", "--method", "base,renders", "--smoke", "--steps", "3"])
    config = config_from_args(args)
    assert config.method_list() == ["base", "renders"] and config.steps == 3 and config.num_identities == 1
    with pytest.raises(ValueError, match="methods"):
        EvalConfig(methods="hyperlora,pulid").method_list()


def test_train_split_scores_people_the_hypernetwork_saw_and_says_so(toy_dir, tmp_path):
    from hyperlora.toy.identity import split_identities
    from tests.test_trait_reader import make_reader

    make_reader(tmp_path / "traits")  # and the second ID judge: every image gets a trait_match
    config = smoke_config(toy_dir, methods="base", split="train", prompts="0", seeds_per_prompt=1,
                          trait_reader=str(tmp_path / "traits"))  # fmt: skip
    summary = run_evaluation(config, tmp_path / "train")
    records = read_records(tmp_path / "train")
    ids = {r["identity"] for r in records}
    assert ids == {split_identities("train")[0]} and ids.isdisjoint(split_identities("test"))
    assert all(0 <= r["trait_match"] <= 1 for r in records) and summary["rows"][0]["trait_match"] is not None
    assert "train-split people (not held out)" in json.dumps(summary)
    with pytest.raises(ValueError, match="split must be one of"):
        run_evaluation(smoke_config(toy_dir, split="holdout"), tmp_path / "bad")


def test_the_clip_gate_is_the_judges_and_a_separate_judge_clip_is_named(toy_dir, tmp_path):
    """CLIP-T and the looks are judged by <toy_dir>/clip_judge when it exists (or --judge-clip): its gate decides the
    label, and the conditioning CLIP's own verdict is still named in it."""
    import shutil

    toy = tmp_path / "toy"
    shutil.copytree(toy_dir, toy)

    def set_passed(folder, passed):
        card = folder / "model_card.json"
        values = json.loads(card.read_text()) if card.is_file() else {}
        card.write_text(json.dumps({**values, "passed": passed}))

    for name, passed in (("faces", True), ("vae", True), ("sdxl", True), ("clip", False)):
        set_passed(toy / name, passed)
    config = smoke_config(toy, smoke=False)
    world = ToyWorld(config)  # the world's own CLIP judges: its missed gate makes every number plumbing
    assert world.judge_dir == toy / "clip" and world.plumbing_only and "(clip:" in world.label
    shutil.copytree(toy / "clip", toy / "clip_judge")
    set_passed(toy / "clip_judge", True)
    world = ToyWorld(config)
    assert world.judge_dir == toy / "clip_judge" and world.clip_dir == toy / "clip" and world.clip.name == "clip:clip_judge"
    assert not world.plumbing_only and "judged by" in world.label and "its own gate MISSED" in world.label
    assert world.config.judge_clip == str(toy / "clip_judge"), "config.json records the judge that was used"
    set_passed(toy / "clip_judge", False)
    assert ToyWorld(config).plumbing_only and "judge CLIP" in ToyWorld(config).label
    assert ToyWorld(dataclasses.replace(config, judge_clip=str(toy / "clip"))).judge_dir == toy / "clip"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ToyWorld(dataclasses.replace(config, judge_clip=str(tmp_path / "nowhere")))


def test_hyperlora_checkpoint_personalises_and_resets(toy_dir, tmp_path, monkeypatch):
    """A checkpoint with non-zero LoRAs personalises (stand-in face backend) and changes the generations."""
    from hyperlora import HyperLoRA, find_targets, preset
    from hyperlora.checkpoint import save_checkpoint
    from hyperlora.toy.pipeline import load_toy_pipeline

    monkeypatch.setitem(backends.FACE_BACKENDS, "centre", f"{__name__}:CentreFaceAnalyzer")
    unet = load_toy_pipeline(toy_dir / "sdxl").unet
    torch.manual_seed(0)
    model = HyperLoRA(preset("tiny", id_embed_dim=16), find_targets(unet)).randomize_up_bases(0.5, 0)
    save_checkpoint(model, tmp_path / "ckpt")
    config = smoke_config(toy_dir, methods="hyperlora,base", face_backend="centre", checkpoint=str(tmp_path / "ckpt"),
                          prompts="0")  # fmt: skip
    summary = run_evaluation(config, tmp_path / "run")
    hyper, base = summary["rows"]
    assert hyper["personalization_failures"] == 0 and hyper["personalize_hypernetwork_ms"] > 0
    assert hyper["weights"].startswith("hyperlora checkpoint") and hyper["label"].startswith(PLUMBING)
    assert hyper["clip_i_disruption"] < 1.0 and hyper["lpips_preservation"] > 0, "a non-zero LoRA changes the images"
    records = read_records(tmp_path / "run")
    for h, b in zip(records[:2], records[2:]):
        assert (h["variant"], b["variant"], h["eval_seed"]) == ("hyperlora", "base", b["eval_seed"])


def test_without_trigger_words_a_zero_lora_changes_nothing_and_a_random_one_changes_the_images(toy_dir, tmp_path,
                                                                                               monkeypatch):  # fmt: skip
    """hyperlora_no_trigger (figure 4) prompts without the trigger words: with the untrained (zero) ID-LoRA its images
    ARE the base model's (pixel change 0), with a non-zero LoRA they differ; with the trigger words they differ too."""
    from hyperlora import HyperLoRA, find_targets, preset
    from hyperlora.checkpoint import save_checkpoint
    from hyperlora.toy.pipeline import load_toy_pipeline

    monkeypatch.setitem(backends.FACE_BACKENDS, "centre", f"{__name__}:CentreFaceAnalyzer")
    torch.manual_seed(0)
    model = HyperLoRA(preset("tiny", id_embed_dim=16), find_targets(load_toy_pipeline(toy_dir / "sdxl").unet))
    changes = {}
    for name, scale in (("zero", 0.0), ("random", 0.5)):
        save_checkpoint(model.randomize_up_bases(scale, 0) if scale else model, tmp_path / name)
        config = smoke_config(toy_dir, methods="hyperlora,hyperlora_no_trigger,base", face_backend="centre",
                              checkpoint=str(tmp_path / name), prompts="0", seeds_per_prompt=1)  # fmt: skip
        rows = {r["variant"]: r for r in run_evaluation(config, tmp_path / f"run_{name}")["rows"]}
        changes[name] = {v: rows[v]["pixel_change"] for v in ("hyperlora", "hyperlora_no_trigger")}
    assert changes["zero"]["hyperlora_no_trigger"] == 0.0, "no LoRA and no trigger words: the base model's images"
    assert changes["zero"]["hyperlora"] > 0, "the trigger words alone change the toy base model's images"
    assert changes["random"]["hyperlora_no_trigger"] > 0, "a non-zero LoRA changes the images without trigger words"


def test_other_reference_control_personalises_from_the_next_person(toy_dir, tmp_path, monkeypatch):
    """hyperlora_other (figure 2's control) uses the next held-out person's references, scored against this one."""
    from hyperlora import HyperLoRA, find_targets, preset
    from hyperlora.checkpoint import save_checkpoint
    from hyperlora.toy.pipeline import load_toy_pipeline

    monkeypatch.setitem(backends.FACE_BACKENDS, "centre", f"{__name__}:CentreFaceAnalyzer")
    torch.manual_seed(0)
    model = HyperLoRA(preset("tiny", id_embed_dim=16), find_targets(load_toy_pipeline(toy_dir / "sdxl").unet))
    save_checkpoint(model.randomize_up_bases(0.5, 0), tmp_path / "ckpt")
    config = smoke_config(toy_dir, methods="hyperlora,hyperlora_other", face_backend="centre", num_identities=2,
                          checkpoint=str(tmp_path / "ckpt"), prompts="0", seeds_per_prompt=1)  # fmt: skip
    summary = run_evaluation(config, tmp_path / "run")
    others = [t for t in summary["timings"] if t["variant"] == "hyperlora_other"]
    people = [r["identity"] for r in read_records(tmp_path / "run") if r["variant"] == "hyperlora"]
    assert [t["reference_identity"] for t in others] == people[1:] + people[:1]
    gap = summary["control_gap"]["id_sim"]
    assert gap["n_pairs"] == 2 and gap["n_identities"] == 2 and gap["control"] == "hyperlora_other"
    with pytest.raises(ValueError, match="num-identities >= 2"):
        run_evaluation(smoke_config(toy_dir, methods="hyperlora_other", checkpoint=str(tmp_path / "ckpt")), tmp_path / "x")


def test_coefficient_rows_fuse_the_persons_fitted_row_and_refuse_people_without_one(toy_dir, tmp_path, monkeypatch):
    """coef_rows scores a table of fitted rows (eval.coefficient_targets) in place of the resampler's coefficients."""
    from safetensors.torch import save_file

    from eval.coefficient_targets import TABLE_FILE
    from hyperlora import HyperLoRA, find_targets, preset
    from hyperlora.checkpoint import save_checkpoint
    from hyperlora.config import TOKENS_PER_MODULE
    from hyperlora.toy.identity import split_identities
    from hyperlora.toy.pipeline import load_toy_pipeline

    monkeypatch.setitem(backends.FACE_BACKENDS, "centre", f"{__name__}:CentreFaceAnalyzer")
    torch.manual_seed(0)
    model = HyperLoRA(preset("tiny", id_embed_dim=16), find_targets(load_toy_pipeline(toy_dir / "sdxl").unet))
    save_checkpoint(model.randomize_up_bases(0.5, 0), tmp_path / "ckpt")
    person = split_identities("test")[0]
    shape = (1, TOKENS_PER_MODULE * len(model.targets), model.config.hyper_dim)
    tokens = torch.nn.functional.normalize(torch.randn(shape), dim=-1)
    (tmp_path / "rows").mkdir()
    table = {"people": torch.tensor([person]), "tokens": tokens, "start": tokens.clone()}
    save_file(table, str(tmp_path / "rows" / TABLE_FILE))
    config = smoke_config(toy_dir, methods="hyperlora,coef_rows", face_backend="centre",
                          checkpoint=str(tmp_path / "ckpt"), coefficient_table=str(tmp_path / "rows"), prompts="0",
                          seeds_per_prompt=1)  # fmt: skip
    rows = {r["variant"]: r for r in run_evaluation(config, tmp_path / "run")["rows"]}
    assert rows["coef_rows"]["weights"].endswith(f"the rows fitted per person in {tmp_path / 'rows'}")
    records = {r["variant"]: r for r in read_records(tmp_path / "run")}
    assert records["coef_rows"]["eval_seed"] == records["hyperlora"]["eval_seed"]
    assert records["coef_rows"]["clip_i_disruption"] != records["hyperlora"]["clip_i_disruption"], "the row's LoRA"
    with pytest.raises(ValueError, match=f"person {split_identities('test')[1]} has no row"):
        run_evaluation(dataclasses.replace(config, num_identities=2), tmp_path / "two")
    with pytest.raises(ValueError, match="needs --coefficient-table"):
        run_evaluation(dataclasses.replace(config, coefficient_table=""), tmp_path / "none")


def test_paired_gap_cancels_shared_noise_and_counts_identities():
    from eval.summary import paired_gap

    rng = np.random.default_rng(0)
    records = []
    for identity in range(4):
        for seed in range(3):
            shared = rng.normal(0, 0.5)  # what the seed and prompt do to both variants alike
            lift = 0.1 if identity < 3 else -0.05
            for variant, value in (("hyperlora", shared + lift), ("hyperlora_other", shared)):
                records.append(dict(variant=variant, identity=identity, prompt_index=0, seed_index=seed, id_sim=value))
    records.append(dict(variant="hyperlora", identity=9, prompt_index=0, seed_index=0, id_sim=5.0))  # unpaired
    gap = paired_gap(records, "hyperlora", "hyperlora_other", "id_sim")
    assert gap["mean"] == pytest.approx((3 * 0.1 - 0.05) / 4) and gap["identities_above_zero"] == 3
    assert gap["n_pairs"] == 12 and gap["sem"] == pytest.approx(np.std([0.1] * 3 + [-0.05], ddof=1) / 2)
    assert paired_gap(records, "hyperlora", "base", "id_sim") is None


def test_paired_warns_when_clip_judged_keys_come_from_two_judges(tmp_path, capsys):
    from eval.paired import main as paired_main

    for name, judge in (("old", None), ("new", "data/toy/clip_judge")):  # "old": before judge_clip existed
        (tmp_path / name).mkdir()
        rows = [dict(variant="hyperlora", identity=i, prompt_index=0, seed_index=0, id_sim=0.1 * i, clip_t=0.3)
                for i in range(3)]  # fmt: skip
        (tmp_path / name / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"world": "toy", "toy_dir": "data/toy", **({"judge_clip": judge} if judge else {})}
        (tmp_path / name / "config.json").write_text(json.dumps({"config": config}))
    runs = [f"old={tmp_path / 'old'}", f"new={tmp_path / 'new'}"]
    assert paired_main([*runs, "--key", "clip_t"]) == 0
    assert "judged by different CLIPs (old: data/toy/clip, new: data/toy/clip_judge)" in capsys.readouterr().err
    assert paired_main([*runs, "--key", "id_sim"]) == 0 and "WARNING" not in capsys.readouterr().err
    assert paired_main([runs[0], f"again={tmp_path / 'old'}", "--key", "clip_t"]) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_reference_looks_avoid_asked_values_and_survive_prompt_sets_that_ask_every_value():
    from eval.prompts import Prompt, load_prompts
    from eval.protocol import reference_look_values

    prompts = load_prompts("toy")
    for identity in range(5):
        values = reference_look_values(identity, prompts, seed=0)
        for name, value in values.items():
            counts = [sum(p.attributes.get(name) == v for p in prompts) for v in LOOK_ATTRIBUTES[name]]
            if name == "glasses" and any("glasses_colour" in p.attributes for p in prompts):
                counts = [c for v, c in zip(LOOK_ATTRIBUTES[name], counts) if v != "none"]
            asked = sum(p.attributes.get(name) == value for p in prompts)
            assert asked == min(counts), f"{name}={value} is asked by {asked} prompts, some value by {min(counts)}"
    every = [Prompt(f"a person wearing a {kind}", "look", {"clothing_type": kind})
             for kind in LOOK_ATTRIBUTES["clothing_type"]]  # fmt: skip
    assert reference_look_values(0, every, seed=0)["clothing_type"] in LOOK_ATTRIBUTES["clothing_type"]


def test_control_gap_figure_reads_saved_runs(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from eval.summary import plot_control_gaps, run_control_gap

    run = tmp_path / "run"
    run.mkdir()
    rows = [dict(variant=v, identity=i, prompt_index=0, seed_index=0, id_sim=x)
            for i in range(3) for v, x in (("hyperlora", 0.2 + i / 100), ("hyperlora_other", 0.0))]  # fmt: skip
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_control_gap(run)["mean"] == pytest.approx(0.21) and run_control_gap(run, "trait_match") is None
    fig = plot_control_gaps({"a run": run}, path=tmp_path / "gaps.png")
    assert (tmp_path / "gaps.png").is_file() and len(fig.axes) == 2


def test_tuning_curves_average_people_first_and_skip_untuned_controls(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from eval.tuning_curves import plot_tuning_curves, tuning_table

    run = tmp_path / "run"
    run.mkdir()
    rows = [dict(variant=v, identity=i, prompt_index=p, seed_index=0, id_sim=x + i / 10 + p / 100)
            for i in range(2) for p in range(2)
            for v, x in (("hyperlora", 0.0), ("zero_ft@10", 0.1), ("zero_ft@20", 0.3), ("renders", 0.9))]  # fmt: skip
    rows.append(dict(variant="zero_ft@10", identity=1, prompt_index=2, seed_index=0, id_sim=float("nan")))
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = [{"variant": "zero_ft@10", "personalize_total_ms": None, "personalize_train_ms": 1000.0},  # dreambooth's
               {"variant": "zero_ft@20", "personalize_total_ms": 3000.0}, {"variant": "hyperlora", "personalize_total_ms": 5.0}]  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"rows": summary}))
    table = {r["variant"]: r for r in tuning_table(run)}
    assert set(table) == {"hyperlora", "zero_ft@10", "zero_ft@20"}, "renders is neither tuned nor zero-shot"
    ten = table["zero_ft@10"]
    assert ten["steps"] == 10 and ten["seconds"] == 1.0 and ten["n_identities"] == 2
    assert ten["mean"] == pytest.approx(0.105 + 0.05) and ten["sem"] == pytest.approx(0.05), "people first, NaN skipped"
    assert table["hyperlora"]["steps"] is None
    fig = plot_tuning_curves(list(table.values()), path=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").is_file() and len(fig.axes) == 2


def test_lora_geometry_measures_the_update_not_the_factors():
    from eval.lora_geometry import update_cosine, update_distance, update_norm
    from hyperlora.lora import LoRAWeights

    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(1, 2, 5, generator=generator), torch.randn(1, 3, 2, generator=generator)
    mix = torch.tensor([[2.0, 1.0], [0.0, 0.5]])  # another factorisation of the same update: B M^-1, M A
    a = LoRAWeights({"x": (down, up)}, rank=2, alpha=2.0)
    b = LoRAWeights({"x": (mix @ down, up @ torch.linalg.inv(mix))}, rank=2, alpha=2.0)
    assert update_norm(a) == pytest.approx(float((up[0] @ down[0]).norm()))
    assert update_cosine(a, b) == pytest.approx(1.0, abs=1e-5) and update_distance(a, b) == pytest.approx(0, abs=1e-5)
    negative = LoRAWeights({"x": (down, -up)}, rank=2, alpha=2.0)
    assert update_cosine(a, negative) == pytest.approx(-1.0, abs=1e-6)
    assert update_distance(a, negative) == pytest.approx(2.0, abs=1e-5)


def test_coefficient_geometry_tells_a_shared_correction_from_personal_ones():
    from eval.lora_geometry import coefficient_geometry

    generator = torch.Generator().manual_seed(0)
    generated = [torch.nn.functional.normalize(torch.randn(1, 3, 8, generator=generator), dim=-1) for _ in range(4)]
    offset = torch.randn(1, 3, 8, generator=generator)
    shared = coefficient_geometry(generated, [g + offset for g in generated])
    assert shared["correction_shared"] == pytest.approx(1.0) and shared["correction_between"] == pytest.approx(1.0)
    personal = coefficient_geometry(generated, [g + torch.randn(1, 3, 8, generator=generator) for g in generated])
    assert personal["correction_shared"] < 0.6 and abs(personal["correction_between"]) < 0.5
    same = coefficient_geometry(generated, generated)
    assert same["fitted_to_generated"] == pytest.approx(1.0) and same["fitted_between"] == same["generated_between"]
    with pytest.raises(ValueError, match="two people"):
        coefficient_geometry(generated[:1], generated[:1])
    with pytest.raises(ValueError, match="differ in shape"):
        coefficient_geometry(generated[:2], [torch.zeros(1, 2, 8)] * 2)
