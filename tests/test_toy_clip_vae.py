"""Toy CLIP and toy VAE: a few smoke steps write folders that the standard loaders read offline."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import (CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                          CLIPVisionModelWithProjection)  # fmt: skip

from hyperlora.tokenizer import clip_tokenizer
from hyperlora.toy.cards import read_model_card, write_model_card
from hyperlora.toy.clip import CLIPTrainConfig, attribute_prompts, evaluate_clip, pixel_values, train_clip
from hyperlora.toy.clip_objectives import (AttributeHeads, HardBatches, caption_targets, multi_positive_loss,
                                           partial_caption)  # fmt: skip
from hyperlora.toy.data import attributes_of, to_tensor
from hyperlora.toy.render import LOOK_ATTRIBUTES, render_sample
from hyperlora.toy.teacher import AttributeCNN
from hyperlora.toy.vae import (VAETrainConfig, build_vae, evaluate_vae, face_crops, identity_distance, psnr, train_vae,
                               vae_loss)

PROMPTS = ["fcsks fxhks fhyks, a portrait of a person with curly red hair, wearing a teal hoodie", "a bald person!"]
SMOKE_CLIP = CLIPTrainConfig.smoke(eval_every=2, val_identities=4, partial_captions=0.5, distill_weight=1.0)
CARD_KEYS = {"config", "command", "git_commit", "train_seconds", "figures", "gates", "weights_mb"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    return train_clip(SMOKE_CLIP, tmp_path_factory.mktemp("toy_clip"))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return train_vae(VAETrainConfig.smoke(), tmp_path_factory.mktemp("toy_vae"))


def _renders(n: int) -> np.ndarray:
    return np.stack([render_sample(i, 0, seed=3).image for i in range(n)])


def test_clip_tokenizer_reloads_with_the_project_ids(clip_dir, tokenizer_dir):
    loaded = CLIPTokenizer.from_pretrained(clip_dir)
    reference = clip_tokenizer(tokenizer_dir)
    for prompt in PROMPTS:
        assert loaded(prompt).input_ids == reference(prompt).input_ids, prompt
    padded = loaded(PROMPTS[1], padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[0] == 49406 and padded[-1] == 49407


def test_clip_towers_load_with_standard_classes(clip_dir):
    config = CLIPTrainConfig.smoke()
    full = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    text = CLIPTextModel.from_pretrained(clip_dir, dtype=torch.float32).eval()
    text_2 = CLIPTextModelWithProjection.from_pretrained(clip_dir, dtype=torch.float32).eval()
    pixels = pixel_values(_renders(2))
    ids = CLIPTokenizer.from_pretrained(clip_dir)(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = vision(pixel_values=pixels, output_hidden_states=True)
        features = out.hidden_states[-2]  # the hypernetwork's CLIP features
        assert features.shape == (2, (64 // config.patch_size) ** 2 + 1, config.vision_hidden)
        assert torch.allclose(out.image_embeds, full.get_image_features(pixel_values=pixels).pooler_output, atol=1e-5)
        hidden = text(ids.input_ids, output_hidden_states=True).hidden_states[-2]  # SDXL's text features
        assert hidden.shape == (2, 77, config.text_hidden)
        reference = full.get_text_features(input_ids=ids.input_ids).pooler_output
        assert torch.allclose(text_2(ids.input_ids).text_embeds, reference, atol=1e-5), "text towers disagree"
    assert not torch.allclose(features[0], features[1]), "different images should give different features"


def test_clip_image_processor_matches_training_preprocessing(clip_dir):
    images = _renders(3)
    processed = CLIPImageProcessor.from_pretrained(clip_dir)(images=list(images), return_tensors="pt").pixel_values
    assert processed.shape == (3, 3, 64, 64)
    assert torch.allclose(processed, pixel_values(images), atol=1e-4)


def test_clip_evaluation_and_card(clip_dir):
    figures = evaluate_clip(clip_dir, num_identities=4, n_per_identity=1)
    assert {"zero_shot", "zero_shot_mean", "i2t_r1", "t2i_r1", "n_images"} <= set(figures)
    assert set(figures["zero_shot"]) <= set(LOOK_ATTRIBUTES) and 0 <= figures["zero_shot_mean"] <= 1
    card = read_model_card(clip_dir)
    assert CARD_KEYS <= set(card) and CLIPTrainConfig.from_dict(card["config"]) == SMOKE_CLIP
    assert card["train_seconds"] > 0 and "zero_shot_mean" in card["figures"] and card["gates"]
    assert [point["step"] for point in card["figures"]["val_curve"]] == [2, 3], "checks every 2 steps and at the end"
    assert set(card["figures"]["teacher_val"]["accuracy"]) == set(LOOK_ATTRIBUTES), "the distillation teacher's figures"
    assert (clip_dir / "README.md").read_text().startswith("# toy CLIP")


def test_attribute_prompts_cover_every_value():
    for attribute, values in LOOK_ATTRIBUTES.items():
        prompts = attribute_prompts(attribute)
        assert list(prompts) == values and all(prompts.values()), attribute
        assert len({tuple(p) for p in prompts.values()}) == len(values), f"{attribute}: two values share prompts"


def test_partial_captions_only_say_what_the_full_caption_says():
    rng = np.random.default_rng(0)
    lengths = []
    for i in range(60):
        render = render_sample(i, 0, seed=1)
        text, named = partial_caption(attributes_of(render), rng)
        assert named and all(attributes_of(render)[name] == value for name, value in named.items())
        prefix = {"portrait", "photo", "picture", "hair", "clothes", "background"}  # said without style/type/pattern
        extra = set(text.replace(",", "").split()) - set(render.caption.replace(",", "").split()) - prefix
        assert not extra, f"{text!r} says {extra}, not in {render.caption!r}"
        lengths.append(len(text) / len(render.caption))
    assert 0.2 < np.mean(lengths) < 0.8


def test_caption_targets_mark_every_image_a_partial_caption_is_true_of():
    a = {name: values[0] for name, values in LOOK_ATTRIBUTES.items()}
    b = {**a, "expression": "smiling", "hair_colour": "red"} if a["expression"] != "smiling" else None
    b = b or {**a, "expression": "neutral", "hair_colour": "red"}
    truth = caption_targets([None, {"expression": b["expression"]}, {"hairstyle": a["hairstyle"]}], [a, b, a])
    assert truth.tolist() == [[True, False, True], [False, True, True], [False, False, True]]


def test_multi_positive_loss_is_clips_loss_with_one_positive_and_rewards_all_true_pairs():
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 5
    clip = (torch.nn.functional.cross_entropy(logits, torch.arange(6))
            + torch.nn.functional.cross_entropy(logits.T, torch.arange(6))) / 2
    assert multi_positive_loss(logits, torch.eye(6, dtype=torch.bool)) == pytest.approx(clip.item(), rel=1e-5)
    truth = torch.eye(6, dtype=torch.bool)
    truth[0, 1] = truth[1, 0] = True  # two images that both captions describe
    agree = torch.eye(6) * 10
    agree[0, 1] = agree[1, 0] = 10
    assert multi_positive_loss(agree, truth) < multi_positive_loss(torch.eye(6) * 10, truth)


def test_attribute_heads_average_the_visible_attributes_only():
    heads = AttributeHeads(4)
    for head in heads.heads.values():  # zero logits: each term is log(number of values)
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    look = {name: values[0] for name, values in LOOK_ATTRIBUTES.items()}
    chance = {name: np.log(len(values)) for name, values in LOOK_ATTRIBUTES.items()}
    loss = heads(torch.randn(2, 4), [look, look])
    assert loss.item() == pytest.approx(np.mean(list(chance.values())), rel=1e-5)
    hidden = {**look, "glasses_colour": ""}  # no glasses: their colour is not in the picture, nor in the loss
    loss = heads(torch.randn(2, 4), [hidden, hidden])
    assert loss.item() == pytest.approx(np.mean([v for k, v in chance.items() if k != "glasses_colour"]), rel=1e-5)


def test_hard_batches_share_an_attribute_and_never_repeat_an_image():
    rng = np.random.default_rng(0)
    attributes = [{name: str(rng.choice(values)) for name, values in LOOK_ATTRIBUTES.items()} for _ in range(600)]
    batches = iter(HardBatches(attributes, 16, hard=1.0, max_fixed=1, seed=0))
    for _ in range(20):
        batch = next(batches)
        assert len(set(batch)) == 16
        assert any(len({attributes[i][name] for i in batch}) == 1 for name in LOOK_ATTRIBUTES), "no shared attribute"
    uniform = iter(HardBatches(attributes, 16, hard=0.0, max_fixed=1, seed=0))
    assert sum(any(len({attributes[i][n] for i in next(uniform)}) == 1 for n in LOOK_ATTRIBUTES) for _ in range(20)) < 5


def test_vae_shapes_and_scaling_factor(vae_dir):
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32).eval()
    images = torch.from_numpy(_renders(2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        assert latents.shape == (2, 8, 16, 16), "f = 4: 64 px -> 16 x 16 x 8 latents"
        assert vae.decode(latents).sample.shape == (2, 3, 64, 64)
    card = read_model_card(vae_dir)
    assert vae.config.scaling_factor == pytest.approx(1 / card["figures"]["latent_std"], rel=1e-4)
    assert CARD_KEYS <= set(card) and "psnr" in card["figures"] and card["git_commit"]
    assert VAETrainConfig.from_dict(card["config"]) == VAETrainConfig.smoke()
    assert 0 <= card["figures"]["identity_net_val_trait_accuracy"] <= 1 and card["figures"]["identity_net_seconds"] > 0


def test_identity_distance_is_zero_on_the_original_and_trains_only_the_reconstruction():
    torch.manual_seed(0)
    net = AttributeCNN(widths=(4, 8, 8), classes={"identity": 5}).eval().requires_grad_(False)
    images = torch.from_numpy(_renders(2)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert identity_distance(net, images, images).item() == pytest.approx(0.0, abs=1e-6)
    recon = (images + 0.3 * torch.randn_like(images)).requires_grad_(True)
    distance = identity_distance(net, recon, images)
    distance.backward()
    assert distance.item() > 0.01 and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    flipped = identity_distance(net, images.flip(-1), images).item()  # a mirrored face moves the features too
    assert flipped > 0.01


def test_face_crops_cut_the_face_box_and_pass_gradients():
    image = torch.zeros(1, 1, 64, 64)
    image[..., 20:40, 10:30] = 1.0  # a "face": rows 20-39, columns 10-29
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    crop = face_crops(image.requires_grad_(True), box, 16, margin=1.0)
    assert crop.shape == (1, 1, 16, 16) and crop[..., 1:-1, 1:-1].min() > 0.99, "the box fills the crop"
    crop.sum().backward()
    assert image.grad[..., 20:40, 10:30].sum() > 0 and image.grad[..., :, 40:].abs().sum() == 0
    wide = face_crops(image.detach(), box, 16, margin=2.0)  # twice the box: the face is the middle half
    assert wide[..., 5:11, 5:11].min() > 0.99 and wide[..., :2, :].max() < 0.01
    assert face_crops(image, box, 0) is image


def test_vae_identity_term_reads_face_crops_and_needs_the_boxes():
    config = VAETrainConfig.smoke()
    vae = build_vae(config)
    net = AttributeCNN(widths=(4, 8, 8), classes={"identity": 5}).eval().requires_grad_(False)
    images = to_tensor(_renders(2))
    boxes = torch.tensor([[16.0, 16.0, 48.0, 48.0]] * 2)
    _, terms = vae_loss(vae, images, config, torch.Generator().manual_seed(0), identity_net=net, boxes=boxes)
    assert terms["identity"] > 0
    with pytest.raises(ValueError, match="face boxes"):
        vae_loss(vae, images, config, identity_net=net)
    whole = VAETrainConfig.smoke(identity_crop=0)
    assert vae_loss(vae, images, whole, torch.Generator().manual_seed(0), identity_net=net)[1]["identity"] > 0


def test_vae_evaluation_keys_and_face_hook(vae_dir):
    calls = []

    def face_embed(images):  # a stand-in embedder: mean colour per image
        calls.append(images.shape)
        return images.reshape(len(images), -1, 3).mean(1)

    figures = evaluate_vae(vae_dir, num_identities=3, n_per_identity=1, face_embed=face_embed)
    assert {"psnr", "psnr_min", "psnr_pooled", "l1", "identity_cosine", "identity_cosine_min"} <= set(figures)
    assert calls == [(3, 64, 64, 3)] * 2, "the hook sees uint8 originals, then reconstructions"
    assert "identity_cosine" not in evaluate_vae(vae_dir, num_identities=1, n_per_identity=1)


def test_psnr_values():
    x = torch.zeros(2, 3, 8, 8)
    assert psnr(x, x + 0.02)[0].item() == pytest.approx(10 * np.log10(4 / 0.02**2), rel=1e-4)
    assert psnr(x, x).min() > 100


def test_model_card_round_trip(tmp_path):
    with pytest.raises(FileNotFoundError, match="save the model"):
        write_model_card(tmp_path / "missing", name="x", summary="", config={}, train_seconds=1, figures={})
    write_model_card(tmp_path, name="toy thing", summary="s", config=VAETrainConfig.smoke(), train_seconds=1.5,
                     figures={"psnr": 30.123, "per": {"a": 1}}, gates={"psnr >= 28": True}, command=["train", "--x"])
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["config"]["block_out_channels"] == [8, 16, 16] and card["passed"] is True
    readme = (tmp_path / "README.md").read_text()
    assert "PASSED" in readme and "psnr: 30.12" in readme and "train --x" in readme


def test_train_clip_command_writes_a_loadable_clip_and_exits_on_its_gate(tmp_path, capsys):
    """`python -m hyperlora.toy train-clip` (the evaluation's judge CLIP): config overrides reach the card, a model
    below its gate exits 1, and unknown keys raise."""
    from hyperlora.toy.__main__ import main

    assert main(["train-clip", "--smoke", "--out", str(tmp_path / "c"), "--set", "seed=3", "steps=2"]) == 1
    card = read_model_card(tmp_path / "c")
    assert card["config"]["seed"] == 3 and card["config"]["steps"] == 2 and card["passed"] is False
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.rindex("{\n  \"gates\""):])["passed"] is False
    CLIPModel.from_pretrained(tmp_path / "c")
    CLIPTokenizer.from_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="stepz"):
        main(["train-clip", "--smoke", "--out", str(tmp_path / "d"), "--set", "stepz=2"])
