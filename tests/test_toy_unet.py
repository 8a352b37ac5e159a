"""The toy base model: UNet trainer, pipeline folder, quality-gate plumbing and the build's step handling."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from hyperlora import find_targets
from hyperlora.toy.build import Step, StepUnavailable, _trainer, selected_steps
from hyperlora.toy.cards import read_model_card
from hyperlora.toy.pipeline import (
    MissingToyModel, assemble_pipeline, evaluate_base_model, load_toy_pipeline, mean_pairwise_cosine,
)  # fmt: skip
from hyperlora.toy.unet import (
    LOSSES_FILE, TrainingCache, UNetTrainConfig, build_toy_unet, diffusion_loss, load_init, load_unet_train_config,
    sample_batch, train_unet,
)  # fmt: skip

# Three SDXL-layout levels, narrow: the smoke run takes seconds.
FAST = dict(block_out_channels=(32, 32, 64), attention_heads=(2, 2, 4), layers_per_block=1, steps=2, threads=1)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return train_unet(UNetTrainConfig.smoke(**FAST), tmp_path_factory.mktemp("unet"), progress=False)


@pytest.fixture(scope="module")
def pipeline_dir(unet_dir, tmp_path_factory):
    return assemble_pipeline(unet_dir, tmp_path_factory.mktemp("toy") / "sdxl")


def test_default_unet_is_sdxl_layout_with_attention_at_every_level():
    with torch.device("meta"):
        unet = build_toy_unet(UNetTrainConfig(), cross_attention_dim=256, pooled_dim=128)  # toy CLIP width 128
    params = sum(p.numel() for p in unet.parameters())
    assert 4e6 <= params <= 10e6, f"default toy UNet has {params / 1e6:.1f} M parameters, wanted 4-10 M"
    assert unet.config.addition_embed_type == "text_time"
    # level 0 has attention too: the face is ~6 latent px there, where LoRAs on attention must reach it (check 0)
    assert unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    targets = find_targets(unet)
    levels = {t.name.split(".")[1] for t in targets if t.name.startswith("down_blocks")}
    assert levels == {"0", "1", "2"}, f"attention expected on down levels 0, 1 and 2, found on {sorted(levels)}"
    assert any(t.cross_attention_dim == 256 for t in targets), "cross-attention must read both encoders' states"


def test_top_level_attention_can_be_turned_off_and_runs():
    config = UNetTrainConfig(**{**FAST, "top_level_attention": False})
    unet = build_toy_unet(config, cross_attention_dim=16, pooled_dim=8, latent_channels=8)
    assert unet.config.down_block_types[0] == "DownBlock2D"
    assert unet.config.up_block_types[-1] == "UpBlock2D"
    levels = {t.name.split(".")[1] for t in find_targets(unet) if t.name.startswith("down_blocks")}
    assert levels == {"1", "2"}
    sample = torch.randn(2, 8, 16, 16)
    added = {"text_embeds": torch.randn(2, 8), "time_ids": torch.zeros(2, 6)}
    out = unet(sample, 10, encoder_hidden_states=torch.randn(2, 5, 16), added_cond_kwargs=added).sample
    assert out.shape == sample.shape and torch.isfinite(out).all()


def test_smoke_training_writes_a_unet_that_reloads_with_its_config(unet_dir):
    assert (unet_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert load_unet_train_config(unet_dir) == UNetTrainConfig.smoke(**FAST)
    curve = json.loads((unet_dir / LOSSES_FILE).read_text())
    assert len(curve) == 2 and all(np.isfinite(point["loss"]) for point in curve)
    card = read_model_card(unet_dir)
    assert card["figures"]["attention_modules"] > 0
    assert card["sources"] == {"clip": "random stand-in", "vae": "random stand-in"}


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_unet_training_resumes_bit_for_bit_and_continues_from_a_trained_unet(tmp_path):
    config = UNetTrainConfig.smoke(**{**FAST, "steps": 4, "checkpoint_every": 2, "ema_decay": 0.9})
    whole = train_unet(config, tmp_path / "whole", progress=False)
    assert (whole / "checkpoints" / "step-2" / "step.json").is_file()
    # a run killed after its step-2 checkpoint: resuming redoes steps 3-4 with the same batches, noise and EMA
    interrupted = tmp_path / "interrupted"
    train_unet(config, interrupted, progress=False)
    (interrupted / "diffusion_pytorch_model.safetensors").unlink()
    train_unet(config, interrupted, progress=False, resume=True)
    ours, theirs = _weights(whole), _weights(interrupted)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "resumed run differs from the uninterrupted one"
    curves = [[(p["step"], p["loss"]) for p in json.loads((d / LOSSES_FILE).read_text())] for d in (whole, interrupted)]
    assert curves[0] == curves[1], "the resumed run's loss curve must continue the checkpoint's"
    # init_from: a longer-trained UNet starts from the trained weights, not from a random init
    more = train_unet(UNetTrainConfig.smoke(**{**FAST, "steps": 1, "lr": 0.0, "init_from": str(whole)}),
                      tmp_path / "more", progress=False)  # fmt: skip
    again = _weights(more)
    assert all(torch.equal(ours[k], again[k]) for k in ours), "lr 0 from init_from must keep the trained weights"
    with pytest.raises(ValueError, match="differs from this config"):
        train_unet(UNetTrainConfig.smoke(**{**FAST, "block_out_channels": (32, 64, 64), "init_from": str(whole)}),
                   tmp_path / "wrong", progress=False)  # fmt: skip


def test_a_deeper_unet_grows_from_a_trained_one_and_computes_what_it_did(unet_dir):
    original = UNet2DConditionModel.from_pretrained(unet_dir)
    config = original.config  # the pooled text joins six time ids in the added embedding's input
    pooled_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    dims = dict(cross_attention_dim=config.cross_attention_dim, latent_channels=config.in_channels, pooled_dim=pooled_dim)
    deeper = build_toy_unet(UNetTrainConfig.smoke(**{**FAST, "transformer_layers_per_block": (2, 2, 3)}), **dims)
    added = load_init(deeper, unet_dir)
    assert added and all(".transformer_blocks.1." in k or ".transformer_blocks.2." in k for k in added)
    assert len(find_targets(deeper)) > len(find_targets(original))
    # the added layers start as the identity: the same output as the trained UNet, to float rounding
    torch.manual_seed(0)
    sample, text = torch.randn(2, dims["latent_channels"], 16, 16), torch.randn(2, 5, dims["cross_attention_dim"])
    added_cond = {"text_embeds": torch.randn(2, dims["pooled_dim"]), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad():
        ours = deeper(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added_cond).sample
        theirs = original(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added_cond).sample
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # and they train: their zeroed output projections take a gradient
    ours = deeper(sample, 500, encoder_hidden_states=text, added_cond_kwargs=added_cond).sample
    ours.square().mean().backward()
    grown = dict(deeper.named_parameters())["down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0.weight"]
    assert grown.grad is not None and grown.grad.abs().sum() > 0


def test_unknown_config_keys_raise():
    with pytest.raises(ValueError, match="unknown UNetTrainConfig keys"):
        UNetTrainConfig.from_dict({"steps": 3, "stepz": 4})


class _Oracle(torch.nn.Module):
    """A 'UNet' that returns a fixed prediction, to check which target the loss compares it with."""

    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, noisy, timesteps, states, added_cond_kwargs):
        return type("Out", (), {"sample": self.prediction})()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_diffusion_loss_is_zero_only_for_the_scheduler_target(kind):
    from diffusers import DDPMScheduler

    from hyperlora.toy.pipeline import NOISE_SCHEDULE

    scheduler = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=kind)
    latents = torch.randn(4, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = {"latents": latents, "encoder_hidden_states": None, "text_embeds": None, "time_ids": None}
    # the loss draws noise then timesteps from its generator: draw them the same way to build the target
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(1000, (4,), generator=g)
    target = noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    other = scheduler.get_velocity(latents, noise, timesteps) if kind == "epsilon" else noise
    for gamma in (None, 5.0):
        exact = diffusion_loss(_Oracle(target), scheduler, batch, torch.Generator().manual_seed(0), gamma)
        wrong = diffusion_loss(_Oracle(other), scheduler, batch, torch.Generator().manual_seed(0), gamma)
        assert exact.item() == pytest.approx(0.0, abs=1e-10) and wrong.item() > 1e-3


def test_old_unet_cards_mean_epsilon(tmp_path):
    from hyperlora.toy.pipeline import trained_prediction_type

    assert trained_prediction_type(tmp_path) == "epsilon"
    (tmp_path / "training_card.json").write_text(json.dumps({"config": {"steps": 3}}))
    assert trained_prediction_type(tmp_path) == "epsilon"
    (tmp_path / "model_card.json").write_text(json.dumps({"config": {"prediction_type": "v_prediction"}}))
    assert trained_prediction_type(tmp_path) == "v_prediction"


def test_caption_dropout_replaces_text_with_the_empty_prompt():
    n, tokens, width, pooled = 6, 77, 8, 4
    cache = TrainingCache(
        latent_mean=torch.zeros(n, 4, 16, 16), latent_std=torch.zeros(n, 4, 16, 16),
        prompt_embeds=torch.ones(n, tokens, width).half(), pooled=torch.ones(n, pooled).half(),
        empty_embeds=torch.zeros(1, tokens, width), empty_pooled=torch.zeros(1, pooled), scaling_factor=0.5,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batch = sample_batch(cache, UNetTrainConfig(batch_size=2000, caption_dropout=0.1), g)
    dropped = batch["encoder_hidden_states"].flatten(1).eq(0).all(1)
    assert torch.equal(dropped, batch["text_embeds"].eq(0).all(1)), "states and pooled must drop together"
    assert 0.07 < dropped.float().mean() < 0.13
    assert batch["time_ids"][0].tolist() == [64, 64, 0, 0, 64, 64]  # original size, crop corner, target size
    assert batch["latents"].abs().max() == 0


def test_pipeline_folder_loads_offline_and_generates_64px(pipeline_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline_dir)
    assert pipe.unet.dtype == torch.float32, "the fp16-shipped UNet should load as float32 on CPU"
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.scheduler.config.use_karras_sigmas and pipe.scheduler.config.algorithm_type == "dpmsolver++"
    assert pipe.scheduler.config.prediction_type == UNetTrainConfig().prediction_type == "v_prediction", (
        "the sampler must read the UNet's output as what it was trained to predict"
    )
    training_card = json.loads((pipeline_dir / "unet" / "training_card.json").read_text())
    assert training_card["config"]["steps"] == FAST["steps"], "the UNet's training card travels with it"
    assert (pipeline_dir / "unet" / LOSSES_FILE).is_file()
    assert len(find_targets(pipe.unet)) > 0
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a portrait of a person with short red hair", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 64, 64, 3), "default size should be the toy size, 64 px"
    assert np.isfinite(out.images).all()
    unet_mb = sum(f.stat().st_size for f in (pipeline_dir / "unet").glob("*.safetensors")) / 1e6
    assert unet_mb <= 25


def test_missing_pipeline_names_the_path_and_the_build_command(tmp_path):
    with pytest.raises(MissingToyModel, match=r"(?s)nowhere.*python -m hyperlora\.toy build"):
        load_toy_pipeline(tmp_path / "nowhere")


def test_evaluation_reports_unmeasured_figures_as_none(pipeline_dir):
    pipe = load_toy_pipeline(pipeline_dir)

    def always_grey(images):
        return [{"background_colour": "grey"} for _ in images]

    figures = evaluate_base_model(pipe, judge=always_grey, detector=lambda image: [(0, 0, 8, 8)],
                                  num_prompts=2, per_prompt=2, steps=1)  # fmt: skip
    assert figures["face_rate"] == 1.0
    assert figures["identity_similarity"] is None and figures["not_measured"] == ["identity_similarity"]
    assert set(figures["per_attribute_accuracy"]) == {"background_colour"}
    ceilings = figures["judge_accuracy_on_renders"], figures["judge_accuracy_through_vae"]  # renders, through the VAE
    assert all(set(ceiling) == {"background_colour"} for ceiling in ceilings)
    assert set(figures["gates"]) == {"attribute_accuracy >= 0.85", "face_rate >= 0.95"}
    assert figures["passed"] == (figures["attribute_accuracy"] >= 0.85)
    unjudged = evaluate_base_model(pipe, num_prompts=1, per_prompt=1, steps=1)
    assert unjudged["passed"] is None and unjudged["gates"] == {}
    assert unjudged["not_measured"] == ["attribute_accuracy", "face_rate", "identity_similarity"]


def test_pairwise_cosine_skips_images_without_a_face():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [float("nan"), 0.0]])
    assert mean_pairwise_cosine(e) == pytest.approx(1.0)
    assert np.isnan(mean_pairwise_cosine(e[2:]))


def test_build_steps_keep_order_and_a_missing_trainer_fails_its_step_only():
    assert selected_steps(["unet", "clip"]) == ["clip", "unet", "sdxl"]
    assert selected_steps(["faces", "sdxl"]) == ["faces", "sdxl"]
    with pytest.raises(ValueError, match="unknown build steps"):
        selected_steps(["unte"])
    with pytest.raises(StepUnavailable, match="hyperlora.toy.not_yet is not written yet"):
        _trainer(Step("x", "hyperlora.toy.not_yet", "train_x", "XConfig", "x"))
    with pytest.raises(StepUnavailable, match="has no train_nothing"):
        _trainer(Step("x", "hyperlora.toy.unet", "train_nothing", "UNetTrainConfig", "x"))


def test_parallel_build_runs_steps_side_by_side_and_fails_only_what_depends_on_a_failure(tmp_path):
    from hyperlora.toy.build import build

    # jobs=2: vae and unet are started as processes; unet waits for vae, then fails for want of clip/ (no stand-ins),
    # and sdxl (--only unet's alias) fails because unet did
    outcomes = build(tmp_path, smoke=True, only=["vae", "unet"], jobs=2)
    assert list(outcomes) == ["vae", "unet", "sdxl"]
    assert outcomes["vae"].startswith("done") and (tmp_path / "vae" / "model_card.json").is_file()
    assert outcomes["unet"].startswith("FAILED") and "unet.log" in outcomes["unet"]
    assert "clip: build it first (--only clip)" in (tmp_path / "logs" / "unet.log").read_text()
    assert outcomes["sdxl"] == "FAILED: needs unet, which failed"


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="thread sharing needs POSIX signals")
def test_parallel_build_gives_an_idle_core_to_the_step_left_running(tmp_path):
    from hyperlora.toy.build import _share_threads

    # A step process as the build starts one: it listens for its share, then trains on one thread.
    child = textwrap.dedent(f"""
        import sys, time, torch
        from hyperlora.toy.build import listen_for_thread_share
        from hyperlora.toy.cards import write_model_card
        torch.set_num_threads(1)
        listen_for_thread_share({str(tmp_path / "unet.threads")!r})
        print("ready", flush=True)
        deadline = time.time() + 60
        while torch.get_num_threads() != 2 and time.time() < deadline:
            time.sleep(0.05)
        write_model_card({str(tmp_path)!r}, name="unet", summary="", config={{}}, train_seconds=1, figures={{}})
        sys.exit(0 if torch.get_num_threads() == 2 else 1)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        assert (tmp_path / "unet.threads").read_text() == "1"  # listening, and says so
        told, old = {"unet": 1, "faces": 1}, 0.0  # started at the epoch: long enough ago to be told
        _share_threads({"unet": (process, None, old), "faces": (process, None, old)}, told, 2, tmp_path)
        assert told == {"unet": 1, "faces": 1}  # two steps on two cores: one thread each, nobody is signalled
        _share_threads({"faces": (process, None, old)}, told, 2, tmp_path)
        assert told["faces"] == 1  # no faces.threads: not listening yet (the signal would kill it), told later
        _share_threads({"unet": (process, None, time.time())}, told, 2, tmp_path)
        assert told["unet"] == 1  # just started: its trainer has yet to set its own threads, told later
        _share_threads({"unet": (process, None, old)}, told, 2, tmp_path)  # faces done: unet gets both cores
        assert told["unet"] == 2 and (tmp_path / "unet.threads").read_text() == "2"
        assert process.wait(timeout=60) == 0
        switch = read_model_card(tmp_path)["environment"]["thread_changes"]
        assert [(c["from"], c["to"]) for c in switch] == [(1, 2)]  # the card says how the step was trained
        assert "1 torch thread(s), 2 from" in (tmp_path / "README.md").read_text()
    finally:
        process.kill()


def test_unet_benchmark_times_real_training_steps():
    from eval.bench_unet import bench

    threads = torch.get_num_threads()
    try:
        assert bench(1, steps=1, warmup=0) > 0
    finally:
        torch.set_num_threads(threads)


def test_train_unet_command_takes_a_shipped_config_with_overrides(tmp_path):
    from hyperlora.toy.__main__ import main

    small = ["steps=2", "batch_size=2", "num_identities=2", "images_per_identity=1", "warmup_steps=1", "ema_decay=0",
             "threads=1", "block_out_channels=[32,32,64]", "attention_heads=[2,2,4]", "layers_per_block=1"]  # fmt: skip
    assert main(["train-unet", "--out", str(tmp_path / "u"), "--set", *small]) == 0
    config = load_unet_train_config(tmp_path / "u")
    assert config.block_out_channels == (32, 32, 64) and config.steps == 2
    assert config.nonsense_prefix_prob == 0.3, "the rest comes from the shipped UNet's training config"
    with pytest.raises(ValueError, match="unknown UNetTrainConfig keys"):
        main(["train-unet", "--out", str(tmp_path / "v"), "--set", "stepz=2"])
