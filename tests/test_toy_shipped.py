"""The shipped toy models load offline through their libraries' normal loaders and do their job."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hyperlora.toy.render import render_sample, split_identities

TOY = Path(__file__).resolve().parents[1] / "data" / "toy"


@pytest.mark.skipif(not (TOY / "faces" / "recognizer.onnx").is_file(), reason="toy face models not shipped")
def test_shipped_face_models_load_and_tell_identities_apart():
    from insightface.model_zoo import get_model

    from hyperlora.conditioning.backends import make_face_analyzer

    recognizer = get_model(str(TOY / "faces" / "recognizer.onnx"))
    assert recognizer.taskname == "recognition" and tuple(recognizer.input_size) == (112, 112)
    analyzer = make_face_analyzer("toy")
    people = split_identities("test")[:4]
    embeddings = {}
    for identity in people:
        for index in range(2):
            image = Image.fromarray(render_sample(identity, index, seed=123).image)
            (face,) = analyzer.detect(image)
            embeddings[identity, index] = face.embedding
    same = [float(embeddings[i, 0] @ embeddings[i, 1]) for i in people]
    different = [float(embeddings[i, 0] @ embeddings[j, 1]) for i in people for j in people if i != j]
    assert min(same) > max(different), f"same {np.round(same, 2)}, different max {max(different):.2f}"


SHIPPED = ("clip", "faces", "vae", "sdxl")  # what `data/toy` holds in git (the build's unet/ is intermediate)
BUDGET_MB = 62  # was 60: the UNet with 64 channels at level 0 (the first to pass the base model's gates and carry a
# person through HyperLoRA's target linears; README, check 0) is 2.3 MB larger in float16, 60.7 MB in all


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def test_the_toy_world_is_shipped_with_cards_within_its_size_budget():
    missing = [name for name in SHIPPED if not (TOY / name / "model_card.json").is_file()]
    assert not missing, f"not shipped: {missing} (python -m hyperlora.toy build --only ...)"
    total = sum(_folder_mb(TOY / name) for name in SHIPPED)
    assert total <= BUDGET_MB, f"shipped toy models take {total:.1f} MB > {BUDGET_MB} MB"


def _test_renders(n: int) -> np.ndarray:
    return np.stack([render_sample(identity, 0, seed=321).image for identity in split_identities("test")[:n]])


def test_shipped_clip_loads_with_plain_from_pretrained_and_reads_colours():
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from hyperlora.toy.clip import attribute_classifiers
    from hyperlora.toy.data import attributes_of

    model = CLIPModel.from_pretrained(TOY / "clip").eval()
    assert model.dtype == torch.float32, "float16 weights are declared float32 to compute in"
    assert CLIPVisionModelWithProjection.from_pretrained(TOY / "clip").dtype == torch.float32
    tokenizer, processor = CLIPTokenizer.from_pretrained(TOY / "clip"), CLIPImageProcessor.from_pretrained(TOY / "clip")
    renders = [render_sample(identity, 0, seed=321) for identity in split_identities("test")[:20]]
    pixels = processor(images=[r.image for r in renders], return_tensors="pt").pixel_values
    with torch.no_grad():
        images = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    values, text = attribute_classifiers(model, tokenizer)["background_colour"]
    predicted = [values[i] for i in (images @ text.T).argmax(-1).tolist()]
    truth = [attributes_of(r)["background_colour"] for r in renders]
    assert np.mean([p == t for p, t in zip(predicted, truth)]) >= 0.9, list(zip(predicted, truth))


def test_shipped_clip_judge_reads_colours_and_finds_glasses_on_true_renders():
    from hyperlora.toy.data import attributes_of
    from hyperlora.toy.pipeline import clip_judge

    people = split_identities("test")[:40]
    renders = [render_sample(identity, index, seed=321) for identity in people for index in (0, 1)]
    verdicts = clip_judge(TOY / "clip")(np.stack([r.image for r in renders]))
    truth = [attributes_of(r) for r in renders]
    assert np.mean([v["clothing_colour"] == t["clothing_colour"] for v, t in zip(verdicts, truth)]) >= 0.9
    # the judge's "none" must not swallow glasses (it did while the glasses prompts carried a t-shirt clause)
    worn = [v["glasses"] != "none" for v, t in zip(verdicts, truth) if t["glasses"] not in ("", "none")]
    assert worn and np.mean(worn) >= 0.5, f"glasses found on {np.mean(worn):.2f} of the renders that wear them"


def test_shipped_judge_clip_passes_its_gate_and_is_not_the_conditioning_clip():
    """data/toy/clip_judge (python -m hyperlora.toy train-clip): the CLIP-T and look judge eval.run uses; it must
    meet the CLIP gate on its card and be another model than clip/, which conditions the base model and HyperLoRA."""
    from safetensors.numpy import load_file

    from hyperlora.toy.cards import read_model_card
    from hyperlora.toy.clip import ZERO_SHOT_GATE

    card = read_model_card(TOY / "clip_judge")
    assert card["passed"] and card["figures"]["zero_shot_mean"] >= ZERO_SHOT_GATE
    judge, own = (load_file(str(TOY / name / "model.safetensors")) for name in ("clip_judge", "clip"))
    key = "vision_model.embeddings.patch_embedding.weight"
    assert judge.keys() == own.keys() and not np.allclose(judge[key], own[key]), "the judge must be a separate model"


def test_shipped_vae_reconstructs_held_out_renders():
    import torch
    from diffusers import AutoencoderKL

    from hyperlora.toy.vae import psnr

    vae = AutoencoderKL.from_pretrained(TOY / "vae").eval()
    images = torch.from_numpy(_test_renders(8)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    assert psnr(images, recon).mean() > 24


def test_shipped_base_model_loads_with_plain_from_pretrained_and_generates():
    import torch
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(TOY / "sdxl")
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype, pipe.vae.dtype} == {torch.float32}
    shipped_vae = load_file(TOY / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.vae.state_dict()[k], v.float()) for k, v in shipped_vae.items()), "two different VAEs"
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a portrait of a person wearing a red hoodie, in front of a plain blue wall", num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all() and out.images.std() > 0.05


HYPERLORA = TOY / "hyperlora"


@pytest.mark.skipif(not (HYPERLORA / "hyper_lora_modules.json").is_file(), reason="toy HyperLoRA not shipped")
def test_the_shipped_hyperlora_loads_by_default_and_its_coefficients_tell_held_out_people_apart():
    import json

    from eval.coefficient_reid import reidentification
    from hyperlora.pipeline import HyperLoRAPipeline

    assert _folder_mb(HYPERLORA) <= 25.5, "a shipped toy HyperLoRA takes at most 25 MB (its card and README aside)"
    card = json.loads((HYPERLORA / "model_card.json").read_text())
    stages = [s["stage"] for s in card["stages"]]  # stage 1, stage 3, then stage-3 continuations
    assert stages[:2] == [1, 3] and set(stages[2:]) <= {3} and card["figures"]["evaluation"]["control_gap"]["id_sim"]
    pipe = HyperLoRAPipeline.from_pretrained("toy")  # no checkpoint given: the shipped one
    assert pipe.hyperlora.config.has_base_lora and "UNTRAINED" not in pipe.label
    assert pipe.id_weight == card["figures"]["evaluation"]["id_scale"], "the default ID weight is the card's"
    result = reidentification(pipe, split_identities("test")[:6])  # new photos: looks 0-1 against 2-3
    assert result["same_cosine"] > result["different_cosine"] + 0.03, result
    assert result["top1"] >= 0.5, result["similarity"]  # chance: 1 of 6
    with pytest.raises(ValueError, match="at least 2 people"):
        reidentification(pipe, split_identities("test")[:1])
