"""The identity loss (a departure from the paper): box crops, the one-step x0, a box recogniser, the stage loss term."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from hyperlora.conditioning.faces import Face
from hyperlora.diffusion import noisy_inputs
from hyperlora.toy.face_recognizer import RecognizerTrainConfig, box_verification, fit_recognizer, load_box_embedder
from hyperlora.toy.faces import FaceEvalConfig, _save_weights
from hyperlora.train.config import resolve
from hyperlora.train.identity_loss import box_crops, identity_loss, path_timesteps, predicted_x0, sample_path
from hyperlora.train.losses import LoRAGenerator, first_per_group, stage_loss

TINY_RUN = {"num_identities": 3, "images_per_identity": 2, "batch_size": 4, "checkpoint_every": 2, "log_every": 1,
            "threads": 1}  # fmt: skip


def test_box_crops_cut_the_box_and_pass_gradients_only_from_inside_it():
    pixels = torch.zeros(1, 3, 32, 32, requires_grad=True)
    with torch.no_grad():
        pixels[:, :, 8:16, 8:16] = 1.0  # a white square exactly where the box is
    box = torch.tensor([[0.25, 0.25, 0.5, 0.5]])
    crop = box_crops(pixels, box, size=16, expand=1.0)
    assert crop.shape == (1, 3, 16, 16) and crop[..., 2:14, 2:14].min() > 0.99, "expand 1 cuts the box itself"
    wide = box_crops(pixels, box, size=16, expand=2.0)
    assert wide[..., :3, :].abs().max() < 1e-6 and wide[..., 6:10, 6:10].min() > 0.99, "expand 2: the box in the middle"
    crop.sum().backward()
    grad = pixels.grad[0, 0]
    assert grad[8:16, 8:16].abs().sum() > 0 and grad[:6].abs().sum() == 0 and grad[20:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"boxes must be \[B, 4\]"):
        box_crops(pixels, torch.zeros(2, 4), size=16, expand=1.0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_predicted_x0_gives_the_clean_latents_back_from_the_true_target(kind):
    scheduler = DDPMScheduler(prediction_type=kind)
    latents = torch.randn(6, 4, 8, 8)
    noisy, timesteps, target = noisy_inputs(scheduler, latents, torch.Generator().manual_seed(0))
    assert torch.allclose(predicted_x0(scheduler, noisy, timesteps, target), latents, atol=2e-3)
    assert not torch.allclose(predicted_x0(scheduler, noisy, timesteps, target + 0.1), latents, atol=2e-3)


@pytest.fixture(scope="module")
def box_recognizer(tmp_path_factory):
    config = RecognizerTrainConfig.smoke(crop="box")
    model, _ = fit_recognizer(config)
    path = tmp_path_factory.mktemp("faces") / "recognizer.safetensors"
    _save_weights(model, config, path)
    return path


def test_a_box_recogniser_loads_as_the_embedder_and_a_keypoint_one_is_refused(box_recognizer, tmp_path):
    embedder = load_box_embedder(box_recognizer)
    embeddings = embedder(torch.rand(3, 3, 64, 64) * 2 - 1, torch.tensor([[0.3, 0.3, 0.7, 0.7]] * 3))
    assert embeddings.shape == (3, 16) and torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in embedder.parameters()), "the recogniser stays frozen"
    figures = box_verification(box_recognizer, config=FaceEvalConfig(identities=3, images_per_identity=2))
    assert figures["genuine_pairs"] == 3 and figures["impostor_pairs"] == 12 and 0 <= figures["best_accuracy"] <= 1
    config = RecognizerTrainConfig.smoke()
    model, _ = fit_recognizer(config)
    _save_weights(model, config, tmp_path / "kps.safetensors")
    with pytest.raises(ValueError, match="reads box crops"):
        load_box_embedder(tmp_path / "kps.safetensors")
    with pytest.raises(FileNotFoundError, match="no recogniser file"):
        load_box_embedder(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="crop must be"):
        RecognizerTrainConfig(crop="eyes")


def test_random_views_of_a_face_vary_the_crop_keep_gradients_and_repeat_with_the_seed(box_recognizer):
    embedder = load_box_embedder(box_recognizer)
    pixels = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)
    boxes = torch.tensor([[0.3, 0.3, 0.7, 0.7], [0.2, 0.25, 0.6, 0.65]])
    exact = embedder.views(pixels, boxes, 4, 0.0)
    assert exact.shape == (1, 2, 16) and torch.equal(exact[0], embedder(pixels, boxes)), "jitter 0: the exact crop"
    views = embedder.views(pixels, boxes, 4, 0.2, torch.Generator().manual_seed(0))
    assert views.shape == (4, 2, 16) and torch.allclose(views.norm(dim=-1), torch.ones(4, 2), atol=1e-5)
    assert (views - exact).abs().amax(-1).min() > 1e-4, "every view is another crop of the face"
    again = embedder.views(pixels, boxes, 4, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(views, again), "the training generator makes the views, so a resumed run repeats them"
    views.sum().backward()
    grad = pixels.grad.abs().sum(1)[0]
    assert grad[26:38, 26:38].sum() > 0 and grad[:8].sum() == 0, "gradients from the face, none from far outside it"
    for count, jitter in ((0, 0.1), (2, 0.5), (2, -0.1)):
        with pytest.raises(ValueError, match="views need count >= 1"):
            embedder.views(pixels, boxes, count, jitter)
    with pytest.raises(ValueError, match="id_loss_views must be >= 1"):
        resolve("toy", 3, stage_overrides={"id_loss_jitter": 0.5})


def test_the_identity_loss_is_added_on_case_a_samples_below_its_timestep(box_recognizer, tmp_path):
    from hyperlora.train.data import sample_batch
    from hyperlora.train.loop import setup_stage

    with pytest.raises(ValueError, match="--id-recognizer"):
        # the toy preset names the shipped recogniser; unset, the loss must refuse to run
        setup_stage(resolve("toy", 3, run={**TINY_RUN, "id_recognizer": ""}, stage_overrides={"id_loss_weight": 1.0}),
                    cache_dir=tmp_path, progress=False)  # fmt: skip
    config = resolve("toy", 3, run={**TINY_RUN, "id_recognizer": str(box_recognizer)},
                     stage_overrides={"id_loss_weight": 1.0, "id_loss_max_timestep": 1000, "case_probs": (1, 0, 0)})
    trainer = setup_stage(config, cache_dir=tmp_path, progress=False)
    assert trainer.identity is not None
    model = trainer.accelerator.unwrap_model(trainer.module).hyperlora
    with torch.no_grad():
        model.randomize_up_bases(0.05)
    batch = sample_batch(trainer.data, trainer.others, config.stage, config.run, torch.Generator().manual_seed(0))

    def loss(stage, identity, **changes):
        return stage_loss(LoRAGenerator(model), trainer.unet, trainer.scheduler, {**batch, **changes}, stage, snr_gamma=None,
                          rng=torch.Generator().manual_seed(1), has_base=True, identity=identity)  # fmt: skip

    with_id, stats = loss(config.stage, trainer.identity)
    plain, plain_stats = loss(config.stage, None)
    assert "loss_id" in stats and "loss_id" not in plain_stats and 0 < stats["loss_id"] <= 2
    assert float(with_id.detach()) == pytest.approx(float(plain) + stats["loss_id"], rel=1e-4), "every sample is case (a)"
    _, none_below = loss(dataclasses.replace(config.stage, id_loss_max_timestep=1), trainer.identity)
    assert "loss_id" not in none_below, "no sample of this batch drew timestep 0"
    _, case_b = loss(config.stage, trainer.identity, case=torch.ones_like(batch["case"]))
    assert "loss_id" not in case_b, "cases (b) and (c) match a teacher, not the image: no identity loss"
    with_id.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.resampler.parameters())

    # the prediction that is the true target implies the image itself: the loss is zero
    noisy, timesteps, target = noisy_inputs(trainer.scheduler, batch["latents"], torch.Generator().manual_seed(2), 300)
    exact = identity_loss(trainer.identity.embedder, trainer.identity.vae, clean=batch["latents"], noisy=noisy, timesteps=timesteps, prediction=target,
                          boxes=batch["face_box"], scheduler=trainer.scheduler)  # fmt: skip
    assert exact.abs().max() < 1e-3


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_a_sampling_path_lands_on_the_clean_latents_its_predictions_imply_and_passes_gradients(kind):
    assert path_timesteps(4) == [999, 749, 499, 249] and path_timesteps(1) == [999]
    with pytest.raises(ValueError, match="at least one step"):
        path_timesteps(0)
    scheduler = DDPMScheduler(prediction_type=kind)
    alphas = scheduler.alphas_cumprod
    clean = torch.randn(2, 4, 8, 8, requires_grad=True)
    seen = []

    def oracle(latents, t):  # the prediction whose x0 is `clean` at every step
        seen.append(t)
        a = alphas[t]
        eps = (latents - a.sqrt() * clean) / (1 - a).sqrt()
        return eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * clean

    out = sample_path(oracle, torch.randn(2, 4, 8, 8), scheduler, 3)
    assert seen == path_timesteps(3) and torch.allclose(out, clean, atol=1e-4)
    out.sum().backward()
    assert torch.allclose(clean.grad, torch.ones_like(clean), atol=1e-3), "the gradient runs back through every step"


def test_first_per_group_takes_one_eligible_sample_of_each_person():
    eligible = torch.tensor([False, True, True, False, False, False, True, True])
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert first_per_group(eligible, group).tolist() == [1, 2, 6]


class _CentreFace:
    """A stand-in face analyser: one face box in the middle of every image, or none."""

    def __init__(self, found: bool):
        self.found = found

    def detect(self, image):
        w, h = image.size
        return [Face(bbox=[w * 0.3, h * 0.3, w * 0.7, h * 0.7], score=1.0, kps=np.zeros((5, 2)))] if self.found else []


def test_the_sampling_path_identity_loss_reads_one_face_per_person_and_reaches_the_resampler(box_recognizer, tmp_path):
    from hyperlora.toy.face_backend import ToyFaceAnalyzer
    from hyperlora.train.data import sample_batch
    from hyperlora.train.loop import setup_stage

    config = resolve("toy", 3, run={**TINY_RUN, "id_recognizer": str(box_recognizer), "caption_dropout": 0.0},
                     stage_overrides={"id_loss_weight": 1.0, "id_loss_path_steps": 2, "case_probs": (1, 0, 0),
                                      "targets_per_reference": 2})  # fmt: skip
    trainer = setup_stage(config, cache_dir=tmp_path, progress=False)
    assert isinstance(trainer.identity.analyzer, ToyFaceAnalyzer) and trainer.identity.empty is not None
    model = trainer.accelerator.unwrap_model(trainer.module).hyperlora
    with torch.no_grad():
        model.randomize_up_bases(0.05)
    batch = sample_batch(trainer.data, trainer.others, config.stage, config.run, torch.Generator().manual_seed(0))

    def loss(found: bool | None, **changes):
        identity = None if found is None else dataclasses.replace(trainer.identity, analyzer=_CentreFace(found))
        return stage_loss(LoRAGenerator(model), trainer.unet, trainer.scheduler, {**batch, **changes}, config.stage,
                          snr_gamma=None, rng=torch.Generator().manual_seed(1), has_base=True, identity=identity)  # fmt: skip

    with_id, stats = loss(True)
    plain, _ = loss(None)
    groups = len(batch["case"]) // 2
    assert stats["id_faces_found"] == 1.0 and 0 < stats["loss_id"] <= 2
    assert float(with_id - plain) == pytest.approx(stats["loss_id"] * groups / len(batch["case"]), rel=1e-3), \
        "one path per person's group, added to that group's first sample"  # fmt: skip
    (with_id - plain).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.resampler.parameters())
    missed, missed_stats = loss(False)
    assert missed_stats["id_faces_found"] == 0 and float(missed) == pytest.approx(float(plain), rel=1e-6)
    _, dropped_stats = loss(True, dropped=torch.ones_like(batch["dropped"]))
    assert "loss_id" not in dropped_stats, "a prompt dropped to '' names no one: no path"
    with pytest.raises(ValueError, match="id_loss_path_steps must be >= 0"):
        dataclasses.replace(config.stage, id_loss_path_steps=-1)
    jittered = dataclasses.replace(config.stage, id_loss_views=3, id_loss_jitter=0.2)
    _, jittered_stats = stage_loss(LoRAGenerator(model), trainer.unet, trainer.scheduler, batch, jittered,
                                   snr_gamma=None, rng=torch.Generator().manual_seed(1), has_base=True,
                                   identity=dataclasses.replace(trainer.identity, analyzer=_CentreFace(True)))  # fmt: skip
    assert 0 < jittered_stats["loss_id"] <= 2 and jittered_stats["loss_id"] != pytest.approx(stats["loss_id"]), \
        "the views' mean cosine is another figure than the exact crop's"  # fmt: skip


def test_the_shipped_box_recogniser_tells_people_apart_and_the_fast_preset_reads_it():
    from hyperlora.train.config import resolve

    path = resolve("toy_fast", "3-path").run.id_recognizer
    assert path == "data/toy/id_recognizer/recognizer.safetensors"
    figures = box_verification(path, config=FaceEvalConfig(identities=30, images_per_identity=3))
    assert figures["verification_accuracy"] > 0.9, figures
    assert figures["genuine_mean"] > figures["impostor_mean"] + 0.4, figures


def test_the_decoupling_term_reads_the_face_sampled_without_trigger_words_against_its_teachers(box_recognizer,
                                                                                              tmp_path):  # fmt: skip
    from hyperlora.train.data import sample_batch
    from hyperlora.train.loop import setup_stage

    config = resolve("toy", 3, run={**TINY_RUN, "id_recognizer": str(box_recognizer), "caption_dropout": 0.0},
                     stage_overrides={"id_loss_weight": 1.0, "id_loss_path_steps": 2, "id_decouple_weight": 1.0,
                                      "case_probs": (0, 1, 0), "targets_per_reference": 2})  # fmt: skip
    trainer = setup_stage(config, cache_dir=tmp_path, progress=False)
    model = trainer.accelerator.unwrap_model(trainer.module).hyperlora
    batch = sample_batch(trainer.data, trainer.others, config.stage, config.run, torch.Generator().manual_seed(0))
    assert (batch["case"] == 1).all()

    def loss(found: bool, stage=config.stage):
        identity = dataclasses.replace(trainer.identity, analyzer=_CentreFace(found))
        return stage_loss(LoRAGenerator(model), trainer.unet, trainer.scheduler, batch, stage, snr_gamma=None,
                          rng=torch.Generator().manual_seed(1), has_base=True, identity=identity)  # fmt: skip

    _, zero = loss(True)  # a zero ID-LoRA (up bases start at zero): case (b)'s student is its teacher
    assert "loss_id" not in zero and zero["loss_decouple"] == pytest.approx(0, abs=1e-5)
    with torch.no_grad():
        model.randomize_up_bases(0.05)
    with_term, stats = loss(True)
    plain, _ = loss(True, dataclasses.replace(config.stage, id_decouple_weight=0.0))
    groups = len(batch["case"]) // 2
    assert stats["loss_decouple"] > 1e-4
    assert float(with_term - plain) == pytest.approx(stats["loss_decouple"] * groups / len(batch["case"]), rel=1e-3)
    (with_term - plain).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.resampler.parameters())
    missed, missed_stats = loss(False)  # the teacher's face is not found: nothing to match
    assert missed_stats["loss_decouple"] != missed_stats["loss_decouple"] and float(missed) == pytest.approx(float(plain))
    for bad in ({"id_loss_path_steps": 0}, {"id_loss_weight": 0.0}, {"id_decouple_weight": -1.0}):
        with pytest.raises(ValueError, match="id_decouple_weight must be >= 0 and needs id_loss_path_steps"):
            dataclasses.replace(config.stage, **bad)
