"""The sdxl world end to end: tiny random stand-ins saved as folders, real photos shipped in packages, dlib faces."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from eval.protocol import EvalConfig, run_evaluation
from eval.sdxl_world import same_architecture, square
from hyperlora.checkpoint import save_checkpoint
from hyperlora.conditioning.backends import make_face_analyzer
from hyperlora.conditioning.images import ImageInputError, load_image
from hyperlora.tokenizer import clip_tokenizer
from hyperlora.worlds.sdxl import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, build_unet, tiny_pipeline

from .conftest import random_hyperlora
from .test_conditioning_faces import augmentations, package_file

PLUMBING = "PLUMBING, NOT RESULTS"
TOY_ONLY = ("leakage_mean", "leakage_per_attribute", "adherence_mean", "adherence_per_attribute")
SIZE = 32  # the saved pipeline's default size (UNet sample_size 16 x VAE factor 2), unlike the toy default 64


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """sdxl/ (tiny random pipeline), clip/ (tiny random CLIP with tokenizer) and hyperlora/ (random checkpoint)."""
    pytest.importorskip("dlib")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sdxl_models")
    pipe = tiny_pipeline(tokenizer_dir, seed=0)
    pipe.unet.register_to_config(sample_size=SIZE // 2)  # so the test sees which size the world picked
    pipe.save_pretrained(root / "sdxl")
    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
    text = dict(tower, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(tower, image_size=224, patch_size=14)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).save_pretrained(root / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor.save_pretrained(root / "clip")
    clip_tokenizer(tokenizer_dir).save_pretrained(root / "clip")
    save_checkpoint(random_hyperlora(pipe.unet, id_embed_dim=128), root / "hyperlora")  # dlib embeds in 128-d
    return root


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """refs/<name>/0_original, 1_flip (references), 2_crop, 3_jitter (held out) for the astronaut and Grace Hopper."""
    dlib = make_face_analyzer("dlib")
    root = tmp_path_factory.mktemp("refs")
    people = {"astronaut": ("skimage", "data", "astronaut.png"),
              "grace_hopper": ("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")}  # fmt: skip
    for name, where in people.items():
        image = load_image(package_file(*where))
        face, _ = dlib.analyze_reference(image, pick="best")
        (root / name).mkdir()
        for i, (kind, photo) in enumerate({"original": image, **augmentations(image, face)}.items()):
            photo.save(root / name / f"{i}_{kind}.jpg")
    return root


def sdxl_config(models, refs, **overrides) -> EvalConfig:
    values = dict(world="sdxl", methods="hyperlora,base,renders,dreambooth", sdxl_path=str(models / "sdxl"),
                  clip_path=str(models / "clip"), checkpoint=str(models / "hyperlora"), references=str(refs),
                  face_backend="dlib", judge_backend="dlib", num_identities=1, num_references=2, seeds_per_prompt=2,
                  prompts="0,1", steps=2, dreambooth_steps="1")  # fmt: skip
    return EvalConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def run(models, references, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_sdxl")
    with pytest.warns(UserWarning, match="not independent"):  # dlib both conditions and judges
        summary = run_evaluation(sdxl_config(models, references), out)
    return out, summary


def read_records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_sdxl_run_writes_every_file_and_labels_random_weights_as_plumbing(run):
    out, summary = run
    for name in ("config.json", "records.jsonl", "summary.json", "summary.csv", "grid_hyperlora.png", "grid_base.png",
                 "grid_renders.png", "grid_dreambooth_1.png"):  # fmt: skip
        assert (out / name).is_file(), f"{name} missing"
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["world"] == "sdxl" and config["size"] == SIZE, "size left at its default is the pipeline's own"
    assert [row["variant"] for row in summary["rows"]] == ["hyperlora", "base", "renders", "dreambooth@1"]
    for row in summary["rows"]:
        assert row["label"].startswith(PLUMBING), f"{row['variant']}: random stand-ins must be labelled plumbing"
        assert "RANDOM stand-in: the tiny SDXL-layout UNet" in row["label"] and row["weights"], row["variant"]
        assert "not an independent judgement" in row["label"]
    assert summary["rows"][0]["weights"].startswith("hyperlora checkpoint")
    records = read_records(out)
    assert len(records) == 4 * 2 * 2  # 4 variants x 2 prompts x 2 seeds
    assert {r["identity_name"] for r in records} == {"astronaut"}
    assert all(Image.open(out / r["image"]).size == (SIZE, SIZE) for r in records)


def test_only_sdxl_architecture_counts_as_real_weights():
    sdxl, tiny = (build_unet(name, device="meta").config for name in ("sdxl", "tiny"))
    assert same_architecture(sdxl, SDXL_UNET_CONFIG) and not same_architecture(sdxl, TINY_UNET_CONFIG)
    assert same_architecture(tiny, TINY_UNET_CONFIG) and not same_architecture(tiny, SDXL_UNET_CONFIG)


def test_toy_only_metrics_are_none_with_a_reason(run):
    out, summary = run
    for row in summary["rows"]:
        for key in TOY_ONLY:
            assert row[key] is None, f"{row['variant']}: {key} needs ground truth the sdxl world lacks"
            assert "ground-truth look attributes" in row["not_available"][key]
        assert row["trait_match"] is None and "identity traits" in row["not_available"]["trait_match"]
    assert set(summary["not_available"]) == {*TOY_ONLY, "trait_match"}
    with open(out / "summary.csv") as f:
        assert all(row["leakage_mean"] == "" for row in csv.DictReader(f))
    assert all(row["id_sim"] is not None and row["clip_t"] is not None for row in summary["rows"])


def test_hyperlora_personalises_from_the_photos_and_renders_are_the_held_out_photos(run, references):
    out, summary = run
    hyper = summary["rows"][0]
    assert hyper["personalization_failures"] == 0, "dlib finds the faces in the full-resolution reference photos"
    records = read_records(out)
    by_variant = {v: [r for r in records if r["variant"] == v] for v in ("hyperlora", "base", "renders")}
    changed = [not np.array_equal(*(np.asarray(Image.open(out / r["image"])) for r in pair))
               for pair in zip(by_variant["hyperlora"], by_variant["base"])]  # fmt: skip
    assert any(changed), "a random non-zero LoRA changes the same-seed images"
    held_out = [square(load_image(references / "astronaut" / name), SIZE)[0] for name in ("2_crop.jpg", "3_jitter.jpg")]
    for r in by_variant["renders"]:
        assert r["source"] == "photo"
        assert np.array_equal(np.asarray(Image.open(out / r["image"])), held_out[r["seed_index"]])


def test_a_separate_judge_clip_scores_and_is_named_while_the_hypernetwork_keeps_its_clip(models, references,
                                                                                         tmp_path):  # fmt: skip
    """--judge-clip in the sdxl world: CLIP-T/-I come from the judge, the hypernetwork still reads clip_path, and a
    judge narrower than ViT-L counts as a stand-in in the label."""
    import shutil

    from eval.sdxl_world import SDXLWorld

    shutil.copytree(models / "clip", tmp_path / "judge")
    world = SDXLWorld(sdxl_config(models, references, methods="base", judge_clip=str(tmp_path / "judge")))
    assert world.clip_dir == models / "clip" and world.clip.name == "clip:judge"
    assert "CLIP-T judge" in world.label and "RANDOM stand-in: width 32 < ViT-L's" in world.label and world.plumbing_only
    assert "CLIP-T judge" not in SDXLWorld(sdxl_config(models, references, methods="base")).label


def test_sdxl_has_no_toy_splits(models, references, tmp_path):
    with pytest.raises(ValueError, match="split='train' is toy-only"):
        run_evaluation(sdxl_config(models, references, split="train"), tmp_path / "run")


@pytest.mark.parametrize("field, value, error, message", [
    ("sdxl_path", "", ValueError, "sdxl_path is empty: .*diffusers SDXL pipeline folder"),
    ("sdxl_path", "MISSING", FileNotFoundError, "no diffusers SDXL pipeline at MISSING \\(no model_index.json\\)"),
    ("clip_path", "", ValueError, "clip_path is empty: .*CLIP ViT-L/14 folder"),
    ("clip_path", "MISSING", FileNotFoundError, "no CLIP model at MISSING \\(no config.json\\)"),
    ("references", "", ValueError, "references is empty: .*one subfolder of photos per identity"),
    ("references", "MISSING", FileNotFoundError, "references folder MISSING not found: expected .*/<name>/\\*.jpg"),
])  # fmt: skip
def test_missing_folders_are_named(field, value, error, message, models, references, tmp_path):
    missing = str(tmp_path / "missing")
    config = sdxl_config(models, references, **{field: value.replace("MISSING", missing)})
    with pytest.raises(error, match=message.replace("MISSING", re.escape(missing))):
        run_evaluation(config, tmp_path / "run")


@pytest.mark.parametrize("layout, overrides, error, message", [
    ({}, {}, ValueError, "ROOT holds no identity subfolders: expected .*\\(ROOT/<name>/\\*.jpg\\)"),
    ({"t1": ["a.jpg", "b.jpg", "c.jpg"]}, {"num_identities": 2}, ValueError,
     "ROOT holds 1 identity subfolders \\(t1\\), fewer than num_identities=2"),
    ({"t1": ["t1.jpg", "notes.txt"]}, {}, ValueError, "ROOT/t1 holds 1 photos .*fewer than num_references=2"),
    ({"t1": ["a.jpg", "b.png"]}, {}, ValueError,
     "ROOT/t1: method renders scores held-out photos, but all 2 photos are references"),
    ({"t1": ["a.jpg", "broken.jpg", "c.jpg"]}, {}, ImageInputError, "ROOT/t1/broken.jpg: not an image file"),
])  # fmt: skip
def test_reference_folder_errors_name_the_folder_and_what_is_expected(layout, overrides, error, message, models,
                                                                      references, tmp_path):  # fmt: skip
    """Photos are insightface's t1.jpg; .txt files are not photos, broken.jpg is text under an image name."""
    root = tmp_path / "refs"
    root.mkdir()
    photo = load_image(package_file("insightface", "data", "images", "t1.jpg"))
    for name, files in layout.items():
        (root / name).mkdir()
        for file in files:
            if file.endswith(".txt") or file.startswith("broken"):
                (root / name / file).write_text("not a photo")
            else:
                photo.save(root / name / file)
    config = sdxl_config(models, references, references=str(root), **overrides)
    with pytest.raises(error, match=message.replace("ROOT", re.escape(str(root)))):
        run_evaluation(config, tmp_path / "run")


def test_a_half_precision_run_keeps_every_method_working(models, references, tmp_path):
    """bfloat16 on the CPU stands in for float16 on a GPU: the pipeline, the hypernetwork and the conditioning run
    in the run's dtype, DreamBooth's LoRA trains in float32 beside it, and the judges stay in float32."""
    config = sdxl_config(models, references, dtype="bfloat16", methods="hyperlora,base,dreambooth", prompts="0",
                         seeds_per_prompt=1)  # fmt: skip
    with pytest.warns(UserWarning, match="not independent"):
        summary = run_evaluation(config, tmp_path)
    assert [row["variant"] for row in summary["rows"]] == ["hyperlora", "base", "dreambooth@1"]
    assert all(np.isfinite(r["clip_t"]) for r in read_records(tmp_path))
    assert summary["rows"][0]["personalization_failures"] == 0, "personalisation failed in bfloat16"
    assert summary["rows"][0]["personalize_hypernetwork_ms"] > 0
    with pytest.raises(ValueError, match="dtype must be"):
        sdxl_config(models, references, dtype="float64").torch_dtype
