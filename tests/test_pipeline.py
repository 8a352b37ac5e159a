import pytest
import torch
from safetensors import safe_open

from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.conditioning import DlibAnalyzer
from hyperlora.conditioning.clip_features import ClipImageEncoder
from hyperlora.conditioning.references import Conditioner
from hyperlora.pipeline import PersonalizedPipeline, with_trigger

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
