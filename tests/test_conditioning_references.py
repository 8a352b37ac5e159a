import io

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.conditioning import DlibAnalyzer, load_image
from hyperlora.conditioning.cache import FeatureCache, build_feature_cache, image_hash
from hyperlora.conditioning.clip_features import ClipImageEncoder
from hyperlora.conditioning.faces import ModelFilesMissingError
from hyperlora.conditioning.references import Conditioner, NoUsableReferenceError, ReferencePhotoWarning
from hyperlora.worlds.sdxl import build_unet

from .test_conditioning_faces import package_file

GRACE = package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")
ASTRONAUT = package_file("skimage", "data", "astronaut.png")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP vision tower (diffusers' IP-Adapter test config), saved as a user would have it."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, image_size=224, projection_dim=32, intermediate_size=37,
                              num_attention_heads=4, num_channels=3, num_hidden_layers=5, patch_size=14)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def conditioner(clip_dir):
    return Conditioner(DlibAnalyzer(), ClipImageEncoder(clip_dir, world="toy"), with_base=True, pick="best")


def test_clip_features_are_the_penultimate_hidden_states(clip_dir):
    encoder = ClipImageEncoder(clip_dir)
    image = load_image(GRACE)
    features = encoder([image, image.convert("L")])
    assert features.shape == (2, 257, 32)
    expected = encoder.model(pixel_values=encoder.pixel_values([image]), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(features[:1], expected)


def test_missing_clip_files_are_named(tmp_path):
    with pytest.raises(ModelFilesMissingError, match=r"preprocessor_config.json.*safetensors.*build --only clip"):
        (tmp_path / "config.json").write_text("{}")
        ClipImageEncoder(tmp_path, world="toy")


def test_references_end_to_end_into_a_hypernetwork(conditioner, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.warns(ReferencePhotoWarning) as caught:
        features = conditioner([str(GRACE), str(bad), str(ASTRONAUT)])
    assert features.sources == [str(GRACE), str(ASTRONAUT)]
    assert features.failures == {str(bad): "not an image file PIL can read (12 bytes, unknown or corrupt header)"}
    shown = [str(w.message) for w in caught]
    assert shown[0] == f"skipping reference {bad}: {features.failures[str(bad)]}", "the path once, then the reason"
    assert shown[1:] == features.warnings and "astronaut.png: the face is only 88 px" in features.warnings[0]
    assert features.arcface.shape == (2, 128) and features.clip.shape == (2, 257, 32)
    assert features.clip_blurred.shape == (2, 257, 32)
    torch.testing.assert_close(features.arcface.norm(dim=-1), torch.ones(2))
    unet = build_unet("tiny")
    model = HyperLoRA(preset("tiny", id_embed_dim=128), find_targets(unet))  # dlib embeddings are 128-d
    with torch.no_grad():
        loras = model.generate(**features.generate_kwargs())
    assert loras["id"].batch_size == 1 and loras["base"].batch_size == 1


def test_all_references_failing_lists_every_reason_once(conditioner, tmp_path):
    blank = tmp_path / "blank.png"
    load_image(GRACE).point(lambda _: 128).save(blank)
    missing = tmp_path / "missing.png"
    with pytest.raises(NoUsableReferenceError, match=r"(?s)none of the 2 .*blank.png.*missing.png") as error:
        conditioner([str(blank), str(missing)])
    lines = str(error.value).splitlines()
    assert lines[2] == f"  {missing}: no such file", "the path is not repeated"
    assert lines[1].startswith(f"  {blank}: no face found (dlib HOG") and lines[1].count("blank.png") == 1
    assert "nearly uniform" in lines[1], "says what was seen"


def test_arrays_bytes_and_file_objects_are_references(conditioner):
    photo = load_image(GRACE)
    encoded = io.BytesIO()
    photo.save(encoded, format="PNG")
    with GRACE.open("rb") as handle:
        features = conditioner([np.asarray(photo), encoded.getvalue(), handle, photo])
    assert features.sources == ["image 0 (<array 600x512x3 uint8>)", f"image 1 (<{len(encoded.getvalue()):,} bytes>)",
                                f"image 2 ({GRACE})", "image 3 (<RGB image 512x600>)"]  # fmt: skip
    assert len(set(features.hashes)) == 1, "the same pixels, however they came"
    torch.testing.assert_close(features.arcface[1:], features.arcface[:1].expand(3, -1))
    with pytest.raises(NoUsableReferenceError, match=r"image 0 \(<array 3x4 float64>\): float arrays are read as "):
        conditioner([np.full((3, 4), 7.0)])


def test_feature_cache_round_trips_by_image_hash(tmp_path):
    images = [load_image(GRACE).resize((32, 32)), load_image(ASTRONAUT).resize((32, 32))]

    def encode(batch):
        return {"arcface": torch.stack([torch.full((4,), float(image_hash(b)[0] == "a")) for b in batch]),
                "valid": torch.ones(len(batch), dtype=torch.bool)}  # fmt: skip

    path = build_feature_cache(images, encode, tmp_path / "cache.safetensors", batch_size=1, description={"encoder": "test"})
    cache = FeatureCache(path)
    assert len(cache) == 2 and images[1] in cache and cache.description == {"encoder": "test"}
    assert cache[images[1]]["valid"].item() is True
    torch.testing.assert_close(cache.lookup([image_hash(images[1]), image_hash(images[0])])["arcface"][1], encode([images[0]])["arcface"][0].half())
    with pytest.raises(KeyError, match="not in"):
        cache.lookup(["0" * 64])
