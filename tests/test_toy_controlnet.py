"""The toy ControlNet: its pose maps, its trainer (resumable, loadable), its pipeline with a generated LoRA fused,
the keypoint-error metric, and the errors at its boundaries."""

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

from eval.controlnet import ControlEvalConfig, load_parts, summarize
from eval.metrics import keypoint_error
from hyperlora.toy.controlnet import (
    BOX_LEVEL,
    DEFAULT_UNET_DIR,
    KEYPOINT_COLOURS,
    ControlNetTrainConfig,
    check_matches,
    load_controlnet_train_config,
    pose_map,
    pose_maps,
    train_controlnet,
)
from hyperlora.toy.identity import split_identities
from hyperlora.toy.render import render_sample
from hyperlora.toy.unet import LOSSES_FILE, UNetTrainConfig, build_toy_unet
from hyperlora.train.resume import curve_seconds, curve_sessions

# Five keypoints far apart (> 6 dot sigmas at 64 px), at sub-pixel positions.
KEYPOINTS = np.array([[12.3, 14.6], [40.8, 13.2], [26.5, 30.25], [14.0, 47.7], [44.4, 50.1]], dtype=np.float32)


def smoke(**overrides) -> ControlNetTrainConfig:
    return ControlNetTrainConfig.smoke(**{"steps": 2, "threads": 1, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A two-step ControlNet for the shipped toy UNet."""
    return train_controlnet(smoke(), tmp_path_factory.mktemp("controlnet"), progress=False)


def test_pose_map_puts_each_dot_on_its_keypoint_in_its_colour():
    image = pose_map(KEYPOINTS, None, 64).astype(np.float64) / 255
    assert image.shape == (64, 64, 3)
    ys, xs = np.mgrid[:64, :64]
    for (x, y), colour in zip(KEYPOINTS, KEYPOINT_COLOURS):
        window = (np.abs(xs - x) <= 5) & (np.abs(ys - y) <= 5)
        weight = image.max(-1) * window
        centre = (weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum()
        assert np.allclose(centre, (x, y), atol=0.05), f"dot centred at {centre}, keypoint at {(x, y)}"
        nearest = image[round(float(y)), round(float(x))]
        assert np.allclose(nearest / nearest.max(), colour, atol=1e-6), f"dot at {(x, y)} has colour {nearest}"
    far = image[32, 2]  # between the dots, away from all of them
    assert far.max() < 1e-3


def test_pose_map_outlines_the_box_and_batches_like_single_maps():
    box = (10.0, 8.0, 50.0, 56.0)
    image = pose_map(KEYPOINTS, box, 64).astype(np.float64) / 255
    assert np.allclose(image[30, 10], BOX_LEVEL, atol=0.01) and np.allclose(image[8, 30], BOX_LEVEL, atol=0.01)
    assert image[32, 2].max() < 1e-3 and image[40, 30].max() < 1e-3, "nothing away from the outline and the dots"
    renders = [render_sample(i, 0, 0) for i in range(3)]
    batch = pose_maps(np.stack([r.keypoints for r in renders]), np.stack([r.box for r in renders]), 64)
    singles = [pose_map(r.keypoints, r.box, 64) for r in renders]
    assert all(np.array_equal((b.permute(1, 2, 0) * 255).round().byte().numpy(), s) for b, s in zip(batch, singles))
    assert pose_map(KEYPOINTS * 2, None, (128, 96)).shape == (128, 96, 3), "any size, keypoints in its pixels"


def test_bad_inputs_raise_and_say_what_is_wrong(tmp_path, trained):
    with pytest.raises(ValueError, match=r"keypoints must be \[5, 2\].*got \[4, 2\]"):
        pose_map(KEYPOINTS[:4])
    with pytest.raises(ValueError, match="finite"):
        pose_maps(np.full((1, 5, 2), np.nan))
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        pose_maps(KEYPOINTS[None], np.zeros((1, 3)))
    with pytest.raises(FileNotFoundError, match="--unet .*nowhere: no diffusers UNet there"):
        train_controlnet(smoke(), tmp_path / "out", unet_dir=tmp_path / "nowhere", progress=False)
    with pytest.raises(ValueError, match=r"downsample 2x, but the VAE's latents are 4x smaller.*give 3 widths"):
        train_controlnet(smoke(conditioning_channels=(16, 32)), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="prediction_type 'epsilon', but the UNet .* predicts 'v_prediction'"):
        train_controlnet(smoke(prediction_type="epsilon"), tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match=r"unknown ControlNetTrainConfig keys \['stepz'\]"):
        ControlNetTrainConfig.from_dict({"stepz": 3})
    narrow = UNetTrainConfig(block_out_channels=(32, 32, 64), attention_heads=(2, 2, 4), layers_per_block=1)
    other = build_toy_unet(narrow, cross_attention_dim=128, pooled_dim=64, latent_channels=8)
    with pytest.raises(ValueError, match=r"another UNet: block_out_channels: ControlNet \[64, 64, 128\] vs UNet"):
        check_matches(ControlNetModel.from_pretrained(trained), other)
    with pytest.raises(FileNotFoundError, match="train-controlnet"):
        load_parts(ControlEvalConfig(controlnet=str(tmp_path / "none")), tmp_path)


def _weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_training_writes_a_loadable_controlnet_and_resumes_bit_for_bit(tmp_path):
    config = smoke(steps=4, checkpoint_every=2, ema_decay=0.9, save_dtype="float32")
    whole = train_controlnet(config, tmp_path / "whole", progress=False)
    assert (whole / "checkpoints" / "step-2" / "step.json").is_file()
    # a run killed after its step-2 checkpoint: resuming redoes steps 3-4 with the same batches, noise and EMA
    interrupted = tmp_path / "interrupted"
    train_controlnet(config, interrupted, progress=False)
    (interrupted / "diffusion_pytorch_model.safetensors").unlink()
    train_controlnet(config, interrupted, progress=False, resume=True)
    ours, theirs = _weights(whole), _weights(interrupted)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "resumed run differs from the uninterrupted one"
    curves = [[(p["step"], p["loss"]) for p in json.loads((d / LOSSES_FILE).read_text())] for d in (whole, interrupted)]
    assert curves[0] == curves[1] and len(curves[0]) == 4, "the resumed run's loss curve must continue the checkpoint's"
    resumed_curve = json.loads((interrupted / LOSSES_FILE).read_text())
    assert [p["session"] for p in resumed_curve] == [0, 0, 1, 1], "steps 3-4 were logged by the second session"
    card = json.loads((interrupted / "model_card.json").read_text())
    assert card["train_seconds"] == pytest.approx(resumed_curve[1]["seconds"] + resumed_curve[3]["seconds"], abs=0.01)
    controlnet = ControlNetModel.from_pretrained(whole)
    check_matches(controlnet, UNet2DConditionModel.from_pretrained(DEFAULT_UNET_DIR))  # made for the shipped UNet
    assert load_controlnet_train_config(whole).prediction_type == "v_prediction", "the UNet's own, from its card"
    card = json.loads((whole / "model_card.json").read_text())
    assert card["sources"]["unet"] == "data/toy/sdxl/unet", "the UNet it steers, named inside the repository"
    assert len(card["sources"]["unet_weights_sha256"]) == 64
    # the zero convolutions that start the ControlNet as the identity are what training moves first
    assert controlnet.controlnet_mid_block.weight.abs().max() > 0
    assert controlnet.controlnet_cond_embedding.conv_out.weight.abs().max() > 0


def test_curve_seconds_add_the_sessions_of_a_resumed_curve():
    marked = [{"seconds": 5, "session": 0}, {"seconds": 9, "session": 0}, {"seconds": 30, "session": 1}]
    assert [len(s) for s in curve_sessions(marked)] == [2, 1] and curve_seconds(marked) == 39
    unmarked = [{"seconds": 5}, {"seconds": 9}, {"seconds": 2}, {"seconds": 4}]  # older curves: seconds restart
    assert curve_seconds(unmarked) == 13 and curve_seconds([]) == 0


def test_train_controlnet_command_takes_overrides_and_a_unet(tmp_path):
    from hyperlora.toy.__main__ import main

    assert main(["train-controlnet", "--out", str(tmp_path / "c"), "--smoke", "--set", "steps=1", "threads=1"]) == 0
    config = load_controlnet_train_config(tmp_path / "c")
    assert config.steps == 1 and config.batch_size == ControlNetTrainConfig.smoke().batch_size
    assert config.caption_dropout == 0.5, "the rest comes from the smoke preset and the defaults"
    assert _weights(tmp_path / "c")["controlnet_mid_block.weight"].dtype == torch.float16, "shipped small"
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        main(["train-controlnet", "--out", str(tmp_path / "d"), "--smoke", "--unet", str(tmp_path / "elsewhere")])
    with pytest.raises(ValueError, match="unknown ControlNetTrainConfig keys"):
        main(["train-controlnet", "--out", str(tmp_path / "e"), "--smoke", "--set", "stepz=2"])


def _reaching(controlnet: ControlNetModel) -> ControlNetModel:
    """`controlnet` with a randomised condition path: a ControlNet starts as the identity (zero convolutions, and a
    condition encoder whose default init all but erases the sparse dots) and a two-step run barely changes that, so
    this is what lets a test see whether the control image reaches the image at all."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        encoder = controlnet.controlnet_cond_embedding
        for conv in encoder.modules():
            if isinstance(conv, torch.nn.Conv2d):  # He init (x 10 at the output): the map's signal gets through
                std = (2 / conv.weight[0].numel()) ** 0.5 * (10 if conv is encoder.conv_out else 1)
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * std)
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    return controlnet


def test_the_controlnet_pipeline_runs_with_a_generated_lora_fused_and_follows_the_control(tmp_path, trained):
    from hyperlora.pipeline import HyperLoRAPipeline
    from hyperlora.worlds.toy import write_untrained_checkpoint

    checkpoint = write_untrained_checkpoint(tmp_path / "hyperlora")
    pipe = HyperLoRAPipeline.from_pretrained("toy", checkpoint=checkpoint,
                                             controlnet=_reaching(ControlNetModel.from_pretrained(trained)))  # fmt: skip
    pipe.pipe.set_progress_bar_config(disable=True)
    person = split_identities("test")[0]
    pipe.personalize([render_sample(person, k, 0).image for k in range(2)])
    pose = render_sample(7, 0, 0)
    shift = np.array([12.0, 8.0], dtype=np.float32)  # the second control: the same face moved right and down
    controls = [Image.fromarray(pose_map(pose.keypoints + d, np.asarray(pose.box) + np.tile(d, 2), 64))
                for d in (0 * shift, shift)]  # fmt: skip

    prompt, sampling = pipe.prompt_as_sent("a portrait of a person"), {**pipe.defaults, "num_inference_steps": 2}

    def generate(control, scale=1.0, pipeline=pipe.pipe):
        extra = {} if control is None else {"image": control, "controlnet_conditioning_scale": scale}
        out = pipeline(prompt, output_type="np", generator=torch.Generator().manual_seed(0), **extra, **sampling)
        return out.images[0]

    plain = StableDiffusionXLPipeline.from_pipe(pipe.pipe)  # the same UNet, LoRA fused, no ControlNet
    plain.set_progress_bar_config(disable=True)
    a, b, off = generate(controls[0]), generate(controls[1]), generate(controls[0], scale=0.0)
    without = generate(None, pipeline=plain)
    assert np.abs(a - b).max() > 1e-2, "another control image must give another image"
    assert np.abs(a - without).max() > 1e-2, "with the control the image must differ from the one without it"
    assert np.array_equal(off, without), "the ControlNet at scale 0 must give the pipeline without it, LoRA fused"
    pipe.reset()
    assert np.abs(generate(controls[0]) - a).max() > 1e-3, "the generated LoRA reaches the ControlNet pipeline's UNet"


def test_the_measurement_can_take_poses_from_the_persons_own_new_renders(tmp_path, trained):
    from eval.controlnet import SMOKE, measure_control

    config = ControlEvalConfig(controlnet=str(trained), pose_source="own", smoke=True, **SMOKE)
    summary = measure_control(config, tmp_path / "own", progress=False)
    assert summary["records"] and all(r["pose_of"] == r["person"] for r in summary["records"])
    assert summary["config"]["pose_source"] == "own" and summary["config"]["id_scale"] == 0.85  # untrained: release's
    with pytest.raises(ValueError, match="pose_source must be 'other' or 'own'"):
        measure_control(ControlEvalConfig(controlnet=str(trained), pose_source="mine", **SMOKE), tmp_path / "bad")


def test_keypoint_error_in_pixels_and_eye_distances_leaves_missed_faces_out():
    target = np.array([[0, 0], [10, 0], [5, 5], [2, 9], [8, 9]], dtype=float)
    result = keypoint_error([target + [3, 4], None, target], np.stack([target] * 3))
    assert result["error_px"] == pytest.approx(2.5) and result["error_iod"] == pytest.approx(0.25)
    assert result["detection_rate"] == pytest.approx(2 / 3) and result["n"] == 3
    assert np.isnan(result["per_image_px"][1])
    assert np.isnan(keypoint_error([None], target)["error_px"]), "no face found: the error is undefined, not 0"
    with pytest.raises(ValueError, match=r"target_kps must be \[5, 2\] or \[2, 5, 2\]"):
        keypoint_error([target, target], np.zeros((3, 5, 2)))
    with pytest.raises(ValueError, match=r"detected_kps\[0\] must be \[5, 2\]"):
        keypoint_error([target[:4]], target)


def test_the_measurement_says_when_identity_is_at_the_floor():
    me, other = np.eye(4)[0], np.eye(4)[1]
    target = [[0, 0], [10, 0], [5, 5], [2, 9], [8, 9]]

    def records(embedding):
        return [{"person": 1, "next_person": 2, "condition": c, "control_kps": target, "kps": target,
                 "embedding": embedding} for c in ("without", "with")]  # fmt: skip

    faces = {1: me, 2: other}
    carried = summarize(records(me), faces, ControlEvalConfig(controlnet="none"), label="x", checkpoint="c")
    assert not carried["identity_at_floor"] and carried["with_controlnet"]["id_sim"] == pytest.approx(1.0)
    assert carried["with_controlnet"]["keypoint_error_px"] == 0 and carried["keypoint_error_iod_gain"] == 0
    generic = summarize(records(np.eye(4)[2]), faces, ControlEvalConfig(controlnet="none"), label="x", checkpoint="c")
    assert generic["identity_at_floor"] and "AT THE FLOOR" in generic["label"]
    lost = records(me)
    lost[1]["embedding"] = np.eye(4)[2]  # the person without the ControlNet, nobody with it
    lost = summarize(lost, faces, ControlEvalConfig(controlnet="none"), label="x", checkpoint="c")
    assert not lost["identity_at_floor"] and lost["identity_at_floor_with_controlnet"]
    assert "AT THE FLOOR with it" in lost["label"] and "does not carry identity" not in lost["label"]


def test_the_shipped_controlnet_steers_the_shipped_unet_and_stays_small():
    import hashlib

    shipped = DEFAULT_UNET_DIR.parents[1] / "controlnet"
    card = json.loads((shipped / "model_card.json").read_text())
    check_matches(ControlNetModel.from_pretrained(shipped), UNet2DConditionModel.from_pretrained(DEFAULT_UNET_DIR))
    unet_weights = sorted(DEFAULT_UNET_DIR.glob("*.safetensors"))[0]
    assert card["sources"]["unet_weights_sha256"] == hashlib.sha256(unet_weights.read_bytes()).hexdigest(), (
        "the ControlNet was trained on another UNet than the shipped one"
    )
    megabytes = sum(f.stat().st_size for f in shipped.iterdir()) / 1e6
    assert megabytes <= 8, f"data/toy/controlnet takes {megabytes:.1f} MB (budget 8)"
    with_control = card["figures"]["eval"]["with_controlnet"]["keypoint_error_iod"]
    assert with_control < card["figures"]["eval"]["without_controlnet"]["keypoint_error_iod"]
