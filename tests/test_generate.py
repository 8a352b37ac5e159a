"""`python -m hyperlora generate / personalize` end to end in the toy world, with an UNTRAINED random checkpoint.

No trained toy HyperLoRA is shipped yet, so every test here writes a small randomly initialised one (random up
bases, so its LoRAs change the images) in the official layout: the images are plumbing, not likeness.
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import hyperlora.generate as generate_module
from hyperlora.__main__ import main
from hyperlora.conditioning.references import Conditioner
from hyperlora.generate import PersonalizeConfig, load
from hyperlora.toy.identity import split_identities
from hyperlora.toy.pipeline import load_toy_pipeline
from hyperlora.toy.render import render_sample
from hyperlora.worlds.toy import write_untrained_checkpoint

UNTRAINED = "UNTRAINED random init"
PROMPTS = ["a portrait of a person", "a person with red hair"]


def untrained_toy_checkpoint(folder):
    """A small random HyperLoRA for the toy UNet's 32 attention modules, saved in float16 like training exports."""
    return write_untrained_checkpoint(folder, seed=0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """checkpoint/, two renders of one held-out person, a photo without a face and a corrupt file."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy_generate")
    untrained_toy_checkpoint(root / "checkpoint")
    person = split_identities("test")[0]
    for k in range(2):
        Image.fromarray(render_sample(person, k, seed=0).image).save(root / f"face{k}.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(root / "blank.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return root


def generate_args(toy, out, *extra):
    faces = [str(toy / "face0.png"), str(toy / "face1.png"), str(toy / "blank.png")]
    return ["generate", "--face", *faces, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--num-images", "2",
            "--steps", "2", "--seed", "5", "--checkpoint", str(toy / "checkpoint"), "--out", str(out), *extra]  # fmt: skip


def with_a_warning(call):
    """Conditioner.__call__ that adds a warning about face1.png, as the conditioner words them ('<photo>: ...')."""

    def wrapped(self, sources):
        features = call(self, sources)
        features.warnings.append(f"{sources[1]}: TEST WARNING, as for a small or grayscale face")
        return features

    return wrapped


@pytest.fixture(scope="module")
def generated(toy):
    """One CLI run (3 photos, one without a face, one with a warning; 2 prompts x 2 seeds) and the lines it logged."""
    out = toy / "out"
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Conditioner, "__call__", with_a_warning(Conditioner.__call__))
            assert main(generate_args(toy, out)) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    return out, json.loads((out / "record.json").read_text()), lines


@pytest.fixture(scope="module")
def toy_pipe(toy):
    """The loaded toy HyperLoRAPipeline, shared by the tests that do not test loading."""
    return load(PersonalizeConfig(face=[], checkpoint=str(toy / "checkpoint")))


def test_generate_writes_images_both_loras_a_contact_sheet_and_the_record(generated, toy):
    out, record, _ = generated
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "id_lora_diffusers.safetensors",
                                                     "id_lora_kohya.safetensors", "images", "record.json"]  # fmt: skip
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "p00_s5.png",
        "p00_s6.png",
        "p01_s5.png",
        "p01_s6.png",
    ]
    assert all(Image.open(p).size == (64, 64) for p in (out / "images").iterdir())
    assert not list(toy.glob(".out.*")), "the temporary folder was left behind"
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 3 * 128 and sheet.height >= 3 * 128, "3 references | 2 x 2 generations"
    with safe_open(str(out / "id_lora_kohya.safetensors"), "pt") as f:
        assert f.metadata()["hyperlora_source_images_sha256"] == record["source_images_sha256"]
        assert f.metadata()["hyperlora_trigger_words"] == "fcsks fxhks fhyks"
    with safe_open(str(out / "id_lora_diffusers.safetensors"), "pt") as f:
        keys = f.keys()
    assert all(k.startswith("unet.") and ".lora_" in k for k in keys)


def test_record_holds_what_reproduces_the_run(generated, toy):
    _, record, _ = generated
    assert record["command"].startswith("python -m hyperlora generate --face")
    assert {"torch", "diffusers", "transformers", "hyperlora", "git_commit"} <= set(record["versions"])
    assert UNTRAINED in record["label"]
    assert record["weights"] == {"id": 0.85, "base": 0.0}
    assert [p["prompt_as_sent"] for p in record["prompts"]] == [f"fcsks fxhks fhyks, {p}" for p in PROMPTS]
    assert all(p["trigger_words_added"] for p in record["prompts"])
    assert record["seeds"] == [5, 6] and [m["seed"] for m in record["images"]] == [5, 6, 5, 6]
    sampling = record["sampling"]
    assert sampling["scheduler"] == "dpmpp_2m_karras" and "use_karras_sigmas=True" in sampling["scheduler_config"]
    assert (sampling["num_inference_steps"], sampling["guidance_scale"], sampling["height"]) == (2, 3.5, 64)
    assert record["timings"]["conditioning_ms"] > 0 and record["timings"]["hypernetwork_ms"] > 0
    assert record["timings"]["load_and_fuse_ms"] > 0


def test_skipped_photos_and_warnings_are_recorded_and_printed(generated, toy):
    _, record, lines = generated
    blank = str(toy / "blank.png")
    photos = {p["source"]: p for p in record["photos"]}
    assert [p["used"] for p in record["photos"]] == [True, True, False]
    reason = photos[blank]["skipped_reason"]
    assert reason and record["skipped"] == {blank: reason}
    assert photos[blank]["face_box"] is None and len(photos[str(toy / "face0.png")]["face_box"]) == 4
    face1 = photos[str(toy / "face1.png")]
    assert any("TEST WARNING" in w for w in face1["warnings"]) and not photos[str(toy / "face0.png")]["warnings"]
    assert set(face1["warnings"]) <= set(record["warnings"])
    for text in [*record["warnings"], reason]:
        assert sum(text in line for line in lines) == 1, f"printed once: {text}"
    assert any(UNTRAINED in line for line in lines), "untrained weights are said loudly"


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_exported_lora_reproduces_the_images_in_a_fresh_diffusers_pipeline(generated, format):
    out, record, _ = generated
    pipe = load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    s = record["sampling"]

    def again(image):
        return np.asarray(pipe(image["prompt_as_sent"], num_inference_steps=s["num_inference_steps"],
                               guidance_scale=s["guidance_scale"], height=s["height"], width=s["width"],
                               generator=torch.Generator().manual_seed(image["seed"])).images[0])  # fmt: skip

    first = np.asarray(Image.open(out / record["images"][0]["file"]))
    assert np.abs(again(record["images"][0]).astype(int) - first).max() > 10, "the LoRA changes the image"
    pipe.load_lora_weights(str(out / f"id_lora_{format}.safetensors"), adapter_name="id")
    pipe.set_adapters(["id"], [record["weights"]["id"]])
    pipe.fuse_lora(components=["unet"], adapter_names=["id"])
    for image in record["images"][:2]:
        np.testing.assert_array_equal(again(image), np.asarray(Image.open(out / image["file"])), image["file"])


def test_a_corrupt_photo_fails_clearly_and_leaves_out_untouched(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        generate_module, "load", lambda _: pytest.fail("models were loaded before the photos were checked")
    )
    out = tmp_path / "out"
    args = generate_args(toy, out)
    args[args.index("--face") + 1] = str(toy / "corrupt.jpg")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {toy / 'corrupt.jpg'}: ") and len(err.splitlines()) == 1, "one line naming the file"
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    out.mkdir()
    (out / "keep.txt").write_text("earlier run")
    assert main([*args, "--overwrite"]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "earlier run"


def test_a_failure_midway_removes_the_partial_folder(toy, toy_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "load", lambda _: toy_pipe)
    monkeypatch.setattr(generate_module, "_contact_sheet", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        main(generate_args(toy, tmp_path / "out"))
    assert list(tmp_path.iterdir()) == [], "the partial output must be removed"


def test_existing_out_is_refused_without_overwrite(toy, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    assert main(generate_args(toy, tmp_path / "out")) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_missing_toy_checkpoint_says_how_to_train_one(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("hyperlora.worlds.toy.DEFAULT_CHECKPOINT", tmp_path / "hyperlora")
    assert main(["personalize", "--face", str(toy / "face0.png"), "--out", str(tmp_path / "id.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no trained toy HyperLoRA" in err and "python -m hyperlora.train --preset toy --stages 1,2,3" in err
    assert "stage3/hyperlora" in err and not (tmp_path / "id.safetensors").exists()


def test_personalize_writes_a_kohya_lora_alone(toy, toy_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "load", lambda _: toy_pipe)
    out = tmp_path / "loras" / "id.safetensors"
    assert main(["personalize", "--face", str(toy / "face0.png"), "--out", str(out)]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["id.safetensors"]
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["hyperlora_format"] == "kohya" and f.metadata()["hyperlora_scale"] == "0.85"
    assert len(keys) == 3 * 4 * 32 and all(k.startswith("lora_unet_") for k in keys), "alpha, down, up x 128 linears"
