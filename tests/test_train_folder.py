"""The sdxl world's folder dataset: real photos shipped in packages, dlib faces, tiny random SDXL and CLIP stand-ins."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image, ImageOps
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from hyperlora.checkpoint import load_checkpoint
from hyperlora.conditioning.images import load_image
from hyperlora.train.__main__ import main as train_main
from hyperlora.train.config import resolve
from hyperlora.train.data import TRAINING_SET_FILE, TrainingSet, sample_batch
from hyperlora.train.folder import (
    REPORT_FILE,
    SDXL_BUCKETS,
    box_in_crop,
    main,
    nearest_bucket,
    prepare_folder,
    read_captions,
    resize_crop,
    scaled_buckets,
)
from hyperlora.worlds.sdxl import tiny_pipeline

from .test_conditioning_faces import package_file

CLIP_WIDTH, DLIB_DIM = 32, 128
TINY_MODEL = dict(hyper_dim=8, rank=4, num_id_tokens=2, id_embed_dim=DLIB_DIM, dim=CLIP_WIDTH, depth=1, heads=2,
                  dim_head=16, ff_mult=2, has_base_lora=True)  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir):
    """sdxl/ (tiny random pipeline: 64 px default size) and clip/ (tiny random CLIP vision tower, width 32)."""
    pytest.importorskip("dlib")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("folder_models")
    tiny_pipeline(tokenizer_dir, seed=0).save_pretrained(root / "sdxl")
    torch.manual_seed(0)
    tower = dict(hidden_size=CLIP_WIDTH, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                 projection_dim=32)
    text = dict(tower, vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(tower, image_size=224, patch_size=32),
                         projection_dim=32)).save_pretrained(root / "clip")  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    processor.save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two people, two photos each at three aspect ratios; a faceless photo, a corrupt file, a face too small, a
    caption-less line and a photo no line names."""
    root = tmp_path_factory.mktemp("photo_folder")
    (root / "images").mkdir()
    astronaut = load_image(package_file("skimage", "data", "astronaut.png"))  # 512x512, face at y 83-171
    grace = load_image(package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"))  # 512 wide, 600 high
    astronaut.save(root / "images" / "astronaut.png")
    astronaut.crop((0, 20, 512, 308)).save(root / "images" / "astronaut_wide.jpg")  # 512x288: the wide bucket
    grace.save(root / "images" / "grace.jpg")
    ImageOps.mirror(grace).save(root / "images" / "grace_mirrored.webp")
    Image.linear_gradient("L").resize((160, 120)).convert("RGB").save(root / "images" / "wall.png")
    (root / "images" / "broken.jpg").write_text("not a jpeg")
    grace.resize((128, 150)).save(root / "images" / "unlisted.jpg")
    grace.resize((128, 150)).save(root / "images" / "grace_small.jpg")  # a 53 px face: too small
    lines = [
        {"file": "images/astronaut.png", "caption": "a woman in a space suit", "person": "eileen"},
        {"file": "images/grace.jpg", "caption": "a woman in uniform", "person": "grace"},
        {"file": "images/wall.png", "caption": "a grey wall"},
        {"file": "images/broken.jpg", "caption": "nothing"},
        {"file": "images/astronaut_wide.jpg", "caption": "a woman with a flag", "person": "eileen"},
        {"file": "images/grace_mirrored.webp", "caption": "a woman in uniform, mirrored", "person": "grace"},
        {"file": "images/no_caption.png", "person": "x"},
        {"file": "images/grace_small.jpg", "caption": "a small photo", "person": "grace"},
    ]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(models, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "set"
    prepare_folder(photos, out, pipeline=models / "sdxl", clip=models / "clip", face_backend="dlib", progress=False)
    data, meta = TrainingSet.load(out / TRAINING_SET_FILE)
    return out, data, meta, json.loads((out / REPORT_FILE).read_text())


def test_prepared_set_loads_with_a_bucket_per_aspect_ratio_and_sdxl_time_ids(prepared):
    out, data, meta, _ = prepared
    files = [row["file"] for row in meta["rows"]]
    assert files == ["images/astronaut.png", "images/grace.jpg", "images/astronaut_wide.jpg",
                     "images/grace_mirrored.webp"]
    assert meta["buckets"] == [[64, 64], [72, 56], [48, 84]], "square, tall and wide photos: SDXL buckets at 64 px"
    assert data.bucket.tolist() == [0, 1, 2, 1] and data.row.tolist() == [0, 0, 0, 1]
    assert [tuple(m.shape) for m in data.latent_mean] == [(1, 4, 32, 32), (2, 4, 36, 28), (1, 4, 24, 42)]
    assert data.valid.all() and len(data) == 4
    # original size (h, w), crop corner (top, left), target size (h, w) from each photo's real crop
    assert data.time_ids[0].tolist() == [512, 512, 0, 0, 64, 64]
    assert data.time_ids[1].tolist() == [600, 512, 0, 2, 72, 56], "600x512 scaled to 72x61, 2 px cut on the left"
    assert data.time_ids[2].tolist() == [288, 512, 0, 0, 48, 84]
    assert data.clip_id.shape == (4, 50, CLIP_WIDTH) and data.arcface.shape == (4, DLIB_DIM)
    assert not (data.clip_base == 0).all() and not torch.equal(data.arcface, data.arcface_aug)
    assert [p.name for p in out.parent.iterdir()] == ["set"], "the temporary folder was moved into place"


def test_every_skipped_photo_is_reported_with_its_reason(prepared):
    _, _, meta, report = prepared
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert sorted(reasons) == ["images/broken.jpg", "images/grace_small.jpg", "images/no_caption.png",
                               "images/unlisted.jpg", "images/wall.png"]
    assert reasons["images/broken.jpg"].startswith("not an image file"), "no 'path: path: reason' repetition"
    assert reasons["images/wall.png"].startswith("no face found")
    assert reasons["images/grace_small.jpg"].startswith("the face is 53x53 px, smaller than min_face_size=64")
    assert reasons["images/no_caption.png"] == "missing caption"
    assert reasons["images/unlisted.jpg"] == "missing caption (no line in captions.jsonl)"
    assert report["counts"] | {"buckets": None} == {"photos": 9, "used": 4, "skipped": 5, "persons": 2,
                                                    "train_photos": 4, "val_photos": 0, "buckets": None}  # fmt: skip
    assert [p["status"] for p in meta["photos"]].count("ok") == 4, "the per-photo status travels in the set too"


def test_photos_of_one_person_are_each_others_references(prepared):
    _, data, _, _ = prepared
    assert [o.tolist() for o in data.others()] == [[2], [3], [0], [1]]
    assert data.person.tolist() == [0, 1, 0, 1]


def test_a_batch_comes_from_one_bucket(prepared):
    _, data, _, _ = prepared
    config = resolve("sdxl", 2, model=TINY_MODEL, run={"data": "x", "batch_size": 3})
    for seed in range(6):
        batch = sample_batch(data, data.others(), config.stage, config.run, torch.Generator().manual_seed(seed))
        buckets = data.bucket[batch["index"]].unique()
        assert len(buckets) == 1
        assert batch["latents"].shape[2:] == data.latent_mean[int(buckets[0])].shape[2:]
        assert batch["time_ids"].shape == (3, 6) and batch["clip"].shape == (3, 50, CLIP_WIDTH)


def test_buckets_scale_with_the_pipeline_and_photos_go_to_the_nearest_ratio():
    class Sdxl:  # SDXL's own numbers: sample size 128, VAE factor 8, three UNet levels
        default_sample_size, vae_scale_factor = 128, 8
        unet = type("Unet", (), {"config": type("C", (), {"block_out_channels": (320, 640, 1280)})})

    assert scaled_buckets(Sdxl) == list(SDXL_BUCKETS)
    assert SDXL_BUCKETS[nearest_bucket((4000, 3000), SDXL_BUCKETS)] == (896, 1152), "4:3 landscape (width, height)"
    assert SDXL_BUCKETS[nearest_bucket((1080, 1920), SDXL_BUCKETS)] == (1344, 768), "9:16 portrait"
    crop, time_ids = resize_crop(Image.new("RGB", (300, 100)), (48, 84))
    assert crop.size == (84, 48) and time_ids == [100, 300, 0, 30, 48, 84]
    # scale 0.48: x 120..180 of the photo -> 57.6..86.4, minus the left crop 30 -> 27.6..56.4 of 84 px
    box = box_in_crop((120, 0, 180, 50), (300, 100), time_ids)
    assert torch.allclose(box, torch.tensor([27.6 / 84, 0.0, 56.4 / 84, 0.5]))
    assert box_in_crop((0, 0, 30, 100), (300, 100), time_ids)[2] == 0.0  # cropped away: clipped to the edge


def test_cli_holds_out_persons_and_prints_each_skip_once(models, photos, tmp_path, capsys):
    out = tmp_path / "with_val"
    argv = ["prepare", "--src", str(photos), "--out", str(out), "--pipeline", str(models / "sdxl"),
            "--clip", str(models / "clip"), "--face-backend", "dlib", "--val-fraction", "0.5", "--max-images", "6"]
    assert train_main(argv) == 0, "python -m hyperlora.train prepare ..."
    train, _ = TrainingSet.load(out / TRAINING_SET_FILE)
    val, _ = TrainingSet.load(out / "val" / TRAINING_SET_FILE)
    assert len(train) == 2 and len(val) == 2
    assert set(train.person.tolist()).isdisjoint(val.person.tolist()), "a held-out person has no training photo"
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("prepared 4 of 6 photos (2 persons;") and "2 train, 2 val" in printed[0]
    wall = json.loads((out / REPORT_FILE).read_text())["skipped"][0]["reason"]
    assert printed[1:] == ["  skipped images/wall.png: " + wall,
                           "  skipped images/broken.jpg: not an image file PIL can read (10 bytes, unknown or corrupt "
                           "header)"]  # fmt: skip
    assert train_main(argv) == 2 and "already exists" in capsys.readouterr().err, "a prepared folder stays as it is"


@pytest.mark.parametrize("captions, message", [
    (None, r"captions.jsonl: missing"),
    ('{"file": "images/a.jpg", "caption": "a"}\n{"file": "images/b.jpg", caption: "b"}\n', r"line 2: not JSON"),
    ('["images/a.jpg"]\n', r'line 1: expected an object with a "file" string'),
    ('{"file": "a.jpg", "caption": "a"}\n\n{"file": "a.jpg", "caption": "b"}\n',
     r"line 3: a.jpg is already listed on line 1"),
])  # fmt: skip
def test_bad_folders_raise_clear_errors(tmp_path, captions, message):
    (tmp_path / "images").mkdir()
    if captions is not None:
        (tmp_path / "captions.jsonl").write_text(captions)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_captions(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_captions(tmp_path / "missing")


def test_a_folder_without_a_usable_photo_is_refused_with_every_reason(models, photos, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for name in ("wall.png", "broken.jpg"):
        (src / "images" / name).write_bytes((photos / "images" / name).read_bytes())
    lines = [{"file": "images/wall.png", "caption": "a wall"}, {"file": "images/broken.jpg"}]
    (src / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["--src", str(src), "--out", str(tmp_path / "out"), "--pipeline", str(models / "sdxl"),
            "--clip", str(models / "clip"), "--face-backend", "dlib", "--quiet"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none of the 2 photos is usable" in err and "images/wall.png: no face found" in err
    assert "images/broken.jpg: missing caption" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "nothing written"


def test_two_training_steps_on_the_prepared_folder_write_a_checkpoint_that_reloads(models, prepared, tmp_path):
    out, *_ = prepared
    config = resolve("sdxl", 1, model=TINY_MODEL, stage_overrides={"steps": 2, "warmup_steps": 0},
                     run={"data": str(out), "pipeline": str(models / "sdxl"), "clip": str(models / "clip"),
                          "threads": 1, "mixed_precision": "no", "batch_size": 2, "grad_accum": 1})  # fmt: skip
    from hyperlora.train.loop import train_stage

    path = train_stage(config, tmp_path / "stage1", progress=False, command=["test"])
    unet = UNet2DConditionModel.from_pretrained(models / "sdxl", subfolder="unet")
    model = load_checkpoint(path, unet=unet)
    assert model.config.id_embed_dim == DLIB_DIM and model.config.dim == CLIP_WIDTH
    assert len((tmp_path / "stage1" / "log.jsonl").read_text().splitlines()) == 1
