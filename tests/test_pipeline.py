import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image
from safetensors import safe_open

from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.checkpoint import load_checkpoint, save_checkpoint
from hyperlora.conditioning import DlibAnalyzer
from hyperlora.conditioning.clip_features import ClipImageEncoder
from hyperlora.conditioning.references import Conditioner
from hyperlora.pipeline import HyperLoRAPipeline, PersonalizedPipeline, with_controlnet, with_trigger
from hyperlora.worlds.sdxl import NEGATIVE_PROMPT, write_standins

from .conftest import reference_features
from .test_conditioning_references import GRACE, clip_dir  # noqa: F401 - fixture


def test_trigger_words_are_prepended_once():
    assert with_trigger("a photo", "fcsks fxhks fhyks") == "fcsks fxhks fhyks, a photo"
    assert with_trigger("fcsks fxhks fhyks, a photo", "fcsks fxhks fhyks") == "fcsks fxhks fhyks, a photo"


@pytest.fixture
def personalized(pipe, clip_dir):  # noqa: F811
    model = HyperLoRA(preset("tiny", id_embed_dim=128), find_targets(pipe.unet)).randomize_up_bases(0.5)
    conditioner = Conditioner(DlibAnalyzer(), ClipImageEncoder(clip_dir), with_base=True, pick="best")
    return PersonalizedPipeline(pipe, model, conditioner)


def test_personalize_generate_reset_and_save(personalized, tmp_path):
    def generate(fn):
        return fn("a portrait", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    base = generate(personalized.pipe)
    with pytest.raises(RuntimeError, match="personalize"):
        personalized("a portrait")
    result = personalized.personalize([str(GRACE)], id_scale=0.9, base_scale=0.5)
    assert set(result.timings_ms) == {"conditioning", "hypernetwork", "load_and_fuse", "total"}
    assert set(result.loras) == {"id", "base"} and result.features.num_refs == 1
    personal = generate(personalized)
    assert (personal - base).abs().max() > 1e-3
    path = personalized.save_lora(tmp_path / "id.safetensors", seed=3)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["hyperlora_source_images_sha256"] == result.source_hash
    personalized.personalize([str(GRACE)], id_scale=0.9, base_scale=0.5)  # again: replaces, does not stack
    torch.testing.assert_close(generate(personalized), personal, rtol=1e-3, atol=1e-4)
    personalized.personalize([str(GRACE)], id_scale=0.9, base_scale=0.5, fuse=False)  # diffusers adapters
    torch.testing.assert_close(generate(personalized), personal, rtol=1e-3, atol=1e-4)
    personalized.reset()
    torch.testing.assert_close(generate(personalized.pipe), base, rtol=0, atol=0)


def test_references_may_be_paths_pil_images_arrays_or_bytes(personalized):
    """The same photo in four forms gives the same identity hash and exactly the same LoRA."""
    image = Image.open(GRACE).convert("RGB")
    results = [personalized.personalize([source]) for source in (str(GRACE), image, np.asarray(image),
                                                                  GRACE.read_bytes())]  # fmt: skip
    for result in results[1:]:
        assert result.source_hash == results[0].source_hash
        for path, (down, up) in result.loras["id"].layers.items():
            torch.testing.assert_close(down, results[0].loras["id"].layers[path][0], rtol=0, atol=0)
            torch.testing.assert_close(up, results[0].loras["id"].layers[path][1], rtol=0, atol=0)
    assert results[0].skipped == {} and isinstance(results[0].warnings, list)


def test_a_float16_checkpoint_takes_float32_features(personalized, tmp_path):
    """fp16 basis and resampler, fp32 CLIP and ArcFace features: cast at the hypernetwork's boundary."""
    save_checkpoint(personalized.hyperlora, tmp_path / "fp16", dtype=torch.float16)
    half = load_checkpoint(tmp_path / "fp16")
    assert next(half.resampler.parameters()).dtype == torch.float16
    features = reference_features(half, 2)
    loras = half.generate(**features, num_refs=2)  # raised "mat1 and mat2 must have the same dtype" before
    full = personalized.hyperlora.generate(**features, num_refs=2)
    path = next(iter(full["id"].layers))
    torch.testing.assert_close(loras["id"].layers[path][0].float(), full["id"].layers[path][0], rtol=2e-2, atol=2e-2)
    result = HyperLoRAPipeline(personalized.pipe, half, personalized.conditioner).personalize([str(GRACE)])
    assert result.loras["id"].batch_size == 1


def test_personalize_defaults_to_the_pipelines_id_weight(personalized):
    assert personalized.personalize([str(GRACE)]).scales["id"] == 0.85  # the release's, without a recorded one
    measured = HyperLoRAPipeline(personalized.pipe, personalized.hyperlora, personalized.conditioner, id_weight=2.5)
    assert measured.personalize([str(GRACE)]).scales["id"] == 2.5
    assert measured.personalize([str(GRACE)], id_scale=1.0).scales["id"] == 1.0


def test_a_controlnet_pipeline_is_personalised_and_restored(personalized):
    control = ControlNetModel.from_unet(personalized.pipe.unet, conditioning_embedding_out_channels=(16, 32))  # f = 2
    pipe = with_controlnet(personalized.pipe, control)
    assert isinstance(pipe, StableDiffusionXLControlNetPipeline)
    wrapped = HyperLoRAPipeline(pipe, personalized.hyperlora, personalized.conditioner)
    edges = Image.fromarray((np.indices((64, 64)).sum(0) % 8 < 4).astype(np.uint8) * 255).convert("RGB")

    def generate(fn):
        return fn("a portrait", image=edges, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base = generate(pipe)
    wrapped.personalize([str(GRACE)])
    assert (generate(wrapped) - base).abs().max() > 1e-3, "the LoRA reaches the ControlNet pipeline's UNet"
    wrapped.reset()
    torch.testing.assert_close(generate(pipe), base, rtol=0, atol=0)


def test_from_pretrained_assembles_the_sdxl_world_with_official_defaults(tmp_path):
    """Stand-in folders (tiny random pipeline, CLIP, checkpoint) through the same loaders as the real weights."""
    pytest.importorskip("dlib")
    paths = write_standins(tmp_path)
    with pytest.raises(ValueError, match="antelopev2 needs --insightface-root"):
        HyperLoRAPipeline.from_pretrained("sdxl", **paths)
    pipe = HyperLoRAPipeline.from_pretrained("sdxl", face_backend="dlib", **paths)
    assert pipe.defaults["negative_prompt"] == NEGATIVE_PROMPT and pipe.defaults["guidance_scale"] == 5.0
    assert pipe.pipe.scheduler.config.use_karras_sigmas and pipe.pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert "NOISE" in pipe.label and "UNTRAINED" in pipe.label
    pipe.personalize([str(GRACE)])
    images = pipe("a portrait", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_a_base_weight_without_a_base_lora_is_refused(personalized):
    model = HyperLoRA(preset("tiny", id_embed_dim=128, has_base_lora=False), find_targets(personalized.pipe.unet))
    release_like = HyperLoRAPipeline(personalized.pipe, model, personalized.conditioner)
    with pytest.raises(ValueError, match="no Base-LoRA"):
        release_like.personalize([str(GRACE)], base_scale=0.5)
    assert release_like.current is None
