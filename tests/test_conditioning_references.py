import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.conditioning import DlibAnalyzer, load_image
from hyperlora.conditioning.cache import FeatureCache, build_feature_cache, image_hash
from hyperlora.conditioning.clip_features import ClipImageEncoder
from hyperlora.conditioning.faces import ModelFilesMissingError
from hyperlora.conditioning.references import Conditioner, NoUsableReferenceError
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
    features = conditioner([str(GRACE), str(bad), str(ASTRONAUT)])
    assert features.sources == [str(GRACE), str(ASTRONAUT)]
    assert list(features.failures) == [str(bad)] and "notes.jpg" in features.failures[str(bad)]
    assert features.arcface.shape == (2, 128) and features.clip.shape == (2, 257, 32)
    assert features.clip_blurred.shape == (2, 257, 32)
    torch.testing.assert_close(features.arcface.norm(dim=-1), torch.ones(2))
    unet = build_unet("tiny")
    model = HyperLoRA(preset("tiny", id_embed_dim=128), find_targets(unet))  # dlib embeddings are 128-d
    with torch.no_grad():
        loras = model.generate(**features.generate_kwargs())
    assert loras["id"].batch_size == 1 and loras["base"].batch_size == 1


def test_all_references_failing_lists_every_reason(conditioner, tmp_path):
    blank = tmp_path / "blank.png"
    load_image(GRACE).point(lambda _: 128).save(blank)
    with pytest.raises(NoUsableReferenceError, match=r"(?s)none of the 2 .*blank.png.*missing.png"):
        conditioner([str(blank), str(tmp_path / "missing.png")])


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
