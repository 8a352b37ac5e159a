"""Evaluation metrics, extractors and prompts: known answers on tiny seeded inputs (random-trunk LPIPS is enough)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from eval.extractors import (ClipExtractor, FaceEmbeddingExtractor, LPIPSModel, RandomTrunkWarning, image_batch,
                             trunk_weights_path)  # fmt: skip
from eval.metrics import (clip_i, clip_i_disruption, clip_i_fidelity, clip_t, face_texture, id_similarity,
                          look_leakage, lpips_diversity, lpips_preservation, prompt_adherence, summarize)  # fmt: skip
from eval.prompts import NEUTRAL, Prompt, load_prompts, neutral_prompt, toy_prompt_text
from hyperlora.conditioning.faces import Face, FaceAnalyzer
from hyperlora.toy.identity import LOOK_ATTRIBUTES

SIZE = 64


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def lpips_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomTrunkWarning)
        return LPIPSModel("alex", seed=0)


# ---------------------------------------------------------------------------------------------
# Identity similarity


def test_id_similarity_identical_is_one_and_orthogonal_is_zero():
    ref = np.eye(4)[:2] * 3.0  # unnormalised on purpose
    same = id_similarity(ref, ref.copy())
    assert same["id_sim"] == pytest.approx(1.0) and same["failure_rate"] == 0.0
    orthogonal = id_similarity(ref, np.eye(4)[2:])
    assert orthogonal["id_sim"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("failed", [None, np.full(4, np.nan)], ids=["none", "nan"])
def test_failed_detection_scores_zero_and_counts(failed):
    ref = np.eye(4)[0]  # one reference shared by all images
    result = id_similarity(ref, [np.eye(4)[0], failed, np.eye(4)[0], failed])
    assert result["per_image"].tolist() == [1.0, 0.0, 1.0, 0.0], "a failed detection must score 0"
    assert result["failure_rate"] == 0.5 and result["n_failed"] == 2
    assert result["id_sim"] == pytest.approx(0.5) and result["id_sim_detected"] == pytest.approx(1.0)
    assert id_similarity(ref, [failed])["id_sim"] == 0.0


def test_id_similarity_accepts_an_array_with_nan_rows_and_refuses_bad_pairs():
    gen = np.stack([np.eye(3)[1], np.full(3, np.nan)])
    assert id_similarity(np.eye(3)[1], gen)["failure_rate"] == 0.5
    with pytest.raises(ValueError, match="reference embeddings"):
        id_similarity(np.eye(3)[:2], [np.eye(3)[0]] * 3)


# ---------------------------------------------------------------------------------------------
# CLIP


def test_clip_t_scales_differ_by_exactly_100():
    g = torch.Generator().manual_seed(0)
    images, text = torch.randn(5, 16, generator=g), torch.randn(16, generator=g)
    result = clip_t(images, text)
    assert result["clip_t_x100"] == 100.0 * result["clip_t_cosine"]
    expected = torch.nn.functional.cosine_similarity(images, text[None], dim=-1).mean().item()
    assert result["clip_t_cosine"] == pytest.approx(expected, abs=1e-6)
    assert clip_t(np.array([1.0, 0.0]), np.array([0.6, 0.8]))["clip_t_cosine"] == pytest.approx(0.6)


def test_clip_i_roles_are_labelled():
    a, b = np.eye(3), np.eye(3)[[0, 2, 1]]
    assert clip_i_fidelity(a, a)["clip_i_fidelity"] == pytest.approx(1.0)
    disruption = clip_i_disruption(a, b)
    assert disruption["role"] == "disruption" and disruption["clip_i_disruption"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="role"):
        clip_i(a, b, role="")


def test_clip_extractor_reads_a_toy_clip_folder(tmp_path):
    from hyperlora.toy.clip import CLIPTrainConfig, build_clip, save_clip

    save_clip(build_clip(CLIPTrainConfig.smoke()), tmp_path, image_size=SIZE, dtype="float32")
    clip = ClipExtractor(tmp_path)
    images, texts = clip(_images(3, 0)), clip.embed_text(["a portrait of a bald person", "a portrait of a person"])
    assert images.shape == (3, 16) and texts.shape == (2, 16)
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert clip(list(_images(3, 0)))[1].allclose(images[1], atol=1e-5), "arrays and lists must embed alike"
    assert -1.0 <= clip_t(images, texts[0])["clip_t_cosine"] <= 1.0


# ---------------------------------------------------------------------------------------------
# Faces


class FakeAnalyzer(FaceAnalyzer):
    """Finds one face in any image that is not all black; its embedding is the image's mean colour."""

    name, embedding_dim = "fake", 3
    search_description = "mean colour > 0"

    def detect(self, image):
        rgb = np.asarray(image, dtype=np.float32)
        if rgb.max() == 0:
            return []
        kps = [[20, 24], [44, 24], [32, 34], [24, 44], [40, 44]]
        return [Face(bbox=[8, 8, 56, 56], score=1.0, kps=kps, embedding=rgb.reshape(-1, 3).mean(0) + 1)]

    def embed(self, image, face):
        raise AssertionError("detect already embeds")


def test_face_extractor_returns_none_where_no_face_and_feeds_id_similarity():
    images = _images(3, 1)
    images[1] = 0
    extractor = FaceEmbeddingExtractor(FakeAnalyzer())
    embeddings = extractor(images)
    assert embeddings[1] is None and embeddings[0].shape == (3,) and extractor.name == "face:fake"
    result = id_similarity(extractor(images[[0, 0, 2]]), embeddings)
    assert result["per_image"][0] == pytest.approx(1.0) and result["failure_rate"] == pytest.approx(1 / 3)
    assert FaceEmbeddingExtractor(FakeAnalyzer(), min_face_size=100)(images[:1]) == [None]


# ---------------------------------------------------------------------------------------------
# LPIPS


def test_lpips_is_zero_on_identical_images_and_positive_on_noise(lpips_model):
    x, noise = _images(2, 2), _images(2, 3)
    assert torch.allclose(lpips_model.distance(x, x), torch.zeros(2), atol=1e-6)
    assert (lpips_model.distance(x, noise) > 0).all()
    assert lpips_model.name.startswith("lpips:alex") and lpips_model.real == trunk_weights_path("alex").is_file()
    features = lpips_model(x)
    assert len(features) == 5 and torch.allclose(features[0].norm(dim=1), torch.ones(1), atol=1e-4)


def test_lpips_diversity_is_zero_for_identical_seeds(lpips_model):
    same = np.repeat(_images(1, 4), 3, axis=0)
    assert lpips_diversity([same, same], lpips_model)["lpips_diversity"] == pytest.approx(0.0, abs=1e-6)
    varied = lpips_diversity([_images(3, 5), same], lpips_model)
    assert varied["per_group"][0] > 0 and varied["n_pairs"] == 6 and varied["lpips_real"] == lpips_model.real
    with pytest.raises(ValueError, match=">= 2"):
        lpips_diversity([_images(1, 6)], lpips_model)


def test_lpips_preservation_ignores_the_face_and_sees_the_rest(lpips_model):
    baseline = _images(2, 7)
    masks = np.zeros((2, SIZE, SIZE), dtype=bool)
    masks[:, 16:48, 20:44] = True
    inside = baseline.copy()
    inside[masks] = 255 - inside[masks]  # change only face pixels
    outside = baseline.copy()
    outside[~masks] = 255 - outside[~masks]
    kept = lpips_preservation(inside, baseline, masks, lpips_model)
    assert kept["lpips_preservation"] == pytest.approx(0.0, abs=1e-6), "changes inside the face mask must not count"
    changed = lpips_preservation(outside, baseline, masks, lpips_model)
    assert (changed["per_image"] > 1e-3).all() and changed["lpips_real"] == lpips_model.real
    with pytest.raises(ValueError, match="whole image"):
        lpips_preservation(inside, baseline, np.ones_like(masks), lpips_model)


def test_lpips_without_trunk_weights_warns_and_is_marked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.warns(RandomTrunkWarning, match="RANDOM"):
        model = LPIPSModel("alex")
    assert model.real is False and model.name == "lpips:alex:random-trunk"


def test_lpips_loads_trunk_weights_from_the_hub_cache(tmp_path, monkeypatch):
    from torchvision.models import alexnet

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(1)
    features = {f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}
    trunk_weights_path("alex").parent.mkdir(parents=True)
    torch.save(features, trunk_weights_path("alex"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomTrunkWarning)
        model = LPIPSModel("alex")
    assert model.real and model.name == "lpips:alex"
    assert torch.equal(model.model.net.slice1[0].weight, features["features.0.weight"])
    assert torch.equal(dict(model.model.net.slice5.named_children())["10"].bias, features["features.10.bias"])


def test_image_batch_refuses_the_vae_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_batch(torch.full((1, 3, 8, 8), -0.5))
    pil = [Image.fromarray(a) for a in _images(2, 8)]
    assert image_batch(pil).shape == (2, 3, SIZE, SIZE)


# ---------------------------------------------------------------------------------------------
# Look leakage and prompt adherence (toy ground truth)


REFERENCE = {"hair_colour": "red", "clothing_colour": "blue", "background_colour": "grey"}
PROMPT = {"hair_colour": "blonde", "clothing_colour": "yellow", "background_colour": "green"}


def test_planted_leakage_is_one_and_none_is_zero():
    leaked = look_leakage([REFERENCE] * 4, [REFERENCE] * 4, [PROMPT] * 4)
    assert leaked["leakage_mean"] == 1.0 and leaked["per_attribute"] == {k: 1.0 for k in PROMPT}
    clean = look_leakage([PROMPT] * 4, [REFERENCE] * 4, [PROMPT] * 4)
    assert clean["leakage_mean"] == 0.0 and clean["n_per_attribute"] == {k: 4 for k in PROMPT}


def test_leakage_counts_only_attributes_the_prompt_changes():
    half = [dict(PROMPT, hair_colour="red"), PROMPT]  # one image copies the reference's hair colour
    result = look_leakage(half, [REFERENCE] * 2, [PROMPT, {"hair_colour": "red"}])  # 2nd asks for the reference's
    assert result["per_attribute"] == {"background_colour": 0.0, "clothing_colour": 0.0, "hair_colour": 1.0}
    assert result["n_per_attribute"]["hair_colour"] == 1 and result["leakage_pooled"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="undefined"):
        look_leakage([REFERENCE], [REFERENCE], [REFERENCE])


def test_prompt_adherence_per_attribute():
    predicted = [PROMPT, dict(PROMPT, clothing_colour="red"), {}]
    result = prompt_adherence(predicted, [PROMPT] * 3)
    assert result["per_attribute"]["hair_colour"] == pytest.approx(2 / 3)
    assert result["per_attribute"]["clothing_colour"] == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# Summaries and prompts


def test_summarize_with_a_seed_axis():
    values = np.array([[1.0, 3.0], [3.0, 5.0]])  # [prompt, seed]
    result = summarize(values, seed_axis=1)
    assert result["mean"] == 3.0 and result["n"] == 4 and result["std"] == pytest.approx(np.std([1, 3, 3, 5], ddof=1))
    assert result["seed_means"] == [2.0, 4.0] and result["seed_std"] == pytest.approx(np.sqrt(2))
    assert summarize([0.5])["std"] == 0.0
    with pytest.raises(ValueError, match="finite"):
        summarize([1.0, float("nan")])


def test_prompts_load_with_valid_attributes_and_one_neutral():
    toy, sdxl = load_prompts("toy"), load_prompts("sdxl")
    assert 15 <= len(toy) <= 25 and 15 <= len(sdxl) <= 25 and all(isinstance(p, Prompt) for p in toy + sdxl)
    for prompt in toy:
        assert 1 <= len(prompt.attributes) <= 3, prompt
        assert all(value in LOOK_ATTRIBUTES[name] for name, value in prompt.attributes.items()), prompt
        assert toy_prompt_text(prompt.attributes) == prompt.text
    assert neutral_prompt("toy").category == NEUTRAL and neutral_prompt("sdxl").text
    assert len({p.category for p in toy}) >= 6 and len({p.category for p in sdxl}) >= 6


def test_toy_prompt_text_refuses_what_captions_cannot_say():
    assert toy_prompt_text({"hairstyle": "bob", "hair_colour": "pink"}) == "a portrait of a person with a pink bob"
    for bad in ({"hair_colour": "red"}, {"hairstyle": "bald", "hair_colour": "red"}, {"glasses": "none"},
                {"expression": "sleepy"}, {"mood": "calm"}):  # fmt: skip
        with pytest.raises(ValueError):
            toy_prompt_text(bad)


def test_face_texture_reads_the_busy_face_inside_its_mask_only():
    flat = np.full((32, 32, 3), 140, np.uint8)
    blotched = flat.copy()
    blotched[8:24:2, 8:24:2] = (30, 60, 220)  # blue specks inside the face box
    outside = flat.copy()
    outside[28:31:2, 2:30:2] = 0  # specks outside it (and its edge)
    masks = np.zeros((4, 32, 32), bool)
    masks[:3, 6:26, 6:26] = True  # the fourth image: no face found
    result = face_texture(np.stack([flat, blotched, outside, blotched]), masks)
    per_image = result["per_image"]
    assert per_image[0] < 1e-6 and per_image[1] > 0.1 and per_image[2] < 1e-6, "only what is inside the mask counts"
    assert np.isnan(per_image[3]) and result["n"] == 3 and result["face_texture"] == pytest.approx(per_image[:3].mean())
    with pytest.raises(ValueError, match="masks must be bool"):
        face_texture(np.stack([flat]), masks)
