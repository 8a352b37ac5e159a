"""HyperLoRA-initialised fine-tuning (hyperlora/finetune.py, `python -m hyperlora finetune`, eval's hyperlora_ft) on the
shipped toy world with an UNTRAINED random checkpoint: the numbers are plumbing, not likeness."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from eval.baselines import make_method
from eval.protocol import EvalConfig, ToyWorld, eval_seed
from eval.run import main as eval_main
from hyperlora.__main__ import main
from hyperlora.coefficient_tune import CoefficientFinetuner, id_coefficients
from hyperlora.diffusion import diffusion_loss
from hyperlora.finetune import (
    INSTANCE_PROMPT,
    FinetuneConfig,
    LoRAFinetuner,
    finetune,
    noise_scheduler,
    reference_batch,
    start_lora,
)
from hyperlora.generate import PersonalizeConfig, load
from hyperlora.lora import functional_lora
from hyperlora.toy.identity import split_identities
from hyperlora.toy.pipeline import load_toy_pipeline
from hyperlora.toy.render import render_sample
from hyperlora.worlds.toy import write_untrained_checkpoint

UNTRAINED = "UNTRAINED"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """checkpoint/ (UNTRAINED, random up bases so its LoRAs are not zero) and two renders of one held-out person."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy_finetune")
    write_untrained_checkpoint(root / "checkpoint", seed=0)
    person = split_identities("test")[0]
    for k in range(2):
        Image.fromarray(render_sample(person, k, seed=0).image).save(root / f"face{k}.png")
    return root


@pytest.fixture(scope="module")
def toy_pipe(toy):
    return load(PersonalizeConfig(face=[], checkpoint=str(toy / "checkpoint")))


def faces(toy) -> list[str]:
    return [str(toy / "face0.png"), str(toy / "face1.png")]


def unet_state(unet) -> dict:
    """Everything fine-tuning could leave behind: weights, requires_grad flags, gradients, forward hooks."""
    return {"weights": {k: v.clone() for k, v in unet.state_dict().items()},
            "requires_grad": [p.requires_grad for p in unet.parameters()],
            "grads": [p.grad is not None for p in unet.parameters()],
            "hooks": sum(len(m._forward_hooks) for m in unet.modules())}  # fmt: skip


def assert_same_unet(before: dict, after: dict) -> None:
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags must be restored"
    assert not any(after["grads"]) and after["hooks"] == before["hooks"] == 0, "no gradients or hooks left behind"
    for key, value in before["weights"].items():
        assert torch.equal(after["weights"][key], value), f"{key} changed"


def tuner_for(pipe, toy, config: FinetuneConfig) -> LoRAFinetuner:
    result = pipe.personalize(faces(toy), id_scale=0.85)
    pipe.reset()
    batch = reference_batch(pipe.pipe, faces(toy), pipe.prompt_as_sent(INSTANCE_PROMPT), 64)
    return LoRAFinetuner(pipe.pipe.unet, noise_scheduler(pipe.pipe), batch, start_lora(config, result.loras["id"]),
                         config)  # fmt: skip


@pytest.mark.parametrize("init", ["hyperlora", "zero"])
def test_a_few_steps_lower_the_loss_on_the_references_and_leave_the_unet_as_it_was(toy_pipe, toy, init):
    unet = toy_pipe.pipe.unet
    before = unet_state(unet)
    tuner = tuner_for(toy_pipe, toy, FinetuneConfig(steps=8, lr=3e-3, init=init, scale=0.85))

    def fixed_noise_loss():  # the same 8 draws of noise and timesteps before and after
        with torch.no_grad():
            return np.mean([float(tuner.loss(torch.Generator().manual_seed(s))) for s in range(8)])

    start = fixed_noise_loss()
    losses = tuner.train(8, progress=False)
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert fixed_noise_loss() < start, f"{init}: 8 steps must lower the diffusion loss on the references"
    assert_same_unet(before, unet_state(unet))


def test_from_hyperlora_at_zero_steps_is_the_generated_lora_exactly(toy_pipe, toy):
    generated = toy_pipe.personalize(faces(toy), id_scale=0.85).loras["id"]
    fused = {k: v.clone() for k, v in toy_pipe.pipe.unet.state_dict().items()}
    result = finetune(toy_pipe, faces(toy), FinetuneConfig(steps=0), progress=False)
    assert result.losses == [] and result.config.scale == 0.85
    assert result.lora.layers.keys() == generated.layers.keys()
    for path, (down, up) in generated.layers.items():
        assert torch.equal(result.lora.layers[path][0], down) and torch.equal(result.lora.layers[path][1], up), path
    assert toy_pipe.current.loras["id"] is result.lora and "finetune" in toy_pipe.current.timings_ms
    for key, value in toy_pipe.pipe.unet.state_dict().items():
        assert torch.equal(value, fused[key]), f"{key}: the same LoRA must fuse to the same weights"
    toy_pipe.reset()


def test_zero_init_at_zero_steps_leaves_the_unet_output_unchanged(toy_pipe, toy):
    tuner = tuner_for(toy_pipe, toy, FinetuneConfig(steps=0, init="zero", seed=3))
    lora = tuner.lora
    assert all(not up.any() and down.abs().sum() > 0 for down, up in lora.layers.values()), "B zero, A random (PEFT)"
    unet, scheduler = toy_pipe.pipe.unet, tuner.scheduler
    plain = diffusion_loss(unet, scheduler, tuner.batch, torch.Generator().manual_seed(0))
    with torch.no_grad(), functional_lora(unet, [lora], [0.85]):
        with_lora = diffusion_loss(unet, scheduler, tuner.batch, torch.Generator().manual_seed(0))
    assert torch.equal(plain, with_lora), "a zero-init LoRA must leave the UNet output unchanged"


def test_the_same_seed_gives_the_same_tune(toy_pipe, toy):
    a, b = (tuner_for(toy_pipe, toy, FinetuneConfig(steps=2, lr=1e-3, init="zero")) for _ in range(2))
    assert a.train(2, progress=False) == b.train(2, progress=False)
    assert all(torch.equal(a.lora.layers[p][1], b.lora.layers[p][1]) for p in a.lora.layers)


@pytest.fixture(scope="module")
def finetuned(toy):
    out = toy / "out"
    args = ["finetune", "--face", *faces(toy), "--checkpoint", str(toy / "checkpoint"), "--steps", "3", "--lr", "1e-2",
            "--prompt", "a portrait of a person", "--sample-steps", "2", "--seed", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    return out, json.loads((out / "record.json").read_text())


def test_the_cli_writes_both_loras_the_record_and_samples_before_and_after(finetuned):
    out, record = finetuned
    assert sorted(p.name for p in out.iterdir()) == ["id_lora_diffusers.safetensors", "id_lora_kohya.safetensors",
                                                     "images", "record.json"]  # fmt: skip
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == ["images/finetuned/p00_s4.png",
                                                                           "images/hyperlora/p00_s4.png"]  # fmt: skip
    assert (record["steps"], record["lr"], record["init"], record["scale"]) == (3, 1e-2, "hyperlora", 0.85)
    assert len(record["losses"]) == 3 and record["seconds"] > 0 and record["timings"]["finetune_ms"] > 0
    assert UNTRAINED in record["label"] and record["command"].startswith("python -m hyperlora finetune --face")
    assert record["training_prompts"] == ["fcsks fxhks fhyks, a portrait of a person"] * 2
    for format in ("kohya", "diffusers"):
        with safe_open(str(out / f"id_lora_{format}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["hyperlora_finetune"])["steps"] == 3 and UNTRAINED in meta["hyperlora_label"]
        assert meta["hyperlora_source_images_sha256"] == record["source_images_sha256"]
    before, after = (np.asarray(Image.open(out / f"images/{k}/p00_s4.png")) for k in ("hyperlora", "finetuned"))
    assert not np.array_equal(before, after), "fine-tuning changed the LoRA"


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_the_exported_lora_reproduces_the_images_in_a_fresh_diffusers_pipeline(finetuned, format):
    out, record = finetuned
    pipe = load_toy_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out / f"id_lora_{format}.safetensors"), adapter_name="id")
    pipe.set_adapters(["id"], [record["scale"]])
    pipe.fuse_lora(components=["unet"], adapter_names=["id"])
    image = next(m for m in record["images"] if m["lora"] == "finetuned")
    again = pipe(image["prompt_as_sent"], num_inference_steps=2, guidance_scale=3.5, height=64, width=64,
                 generator=torch.Generator().manual_seed(image["seed"])).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(again), np.asarray(Image.open(out / image["file"])))


def test_a_wrong_init_or_caption_count_is_refused(toy, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--face", *faces(toy), "--init", "random", "--out", str(tmp_path / "x")])
    args = ["finetune", "--face", *faces(toy), "--caption", "one caption", "--out", str(tmp_path / "x")]
    assert main(args) == 2 and "give one each" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def smoke_config(toy, **overrides) -> EvalConfig:
    values = {"methods": "hyperlora_ft,zero_ft,dreambooth", "num_identities": 1, "seeds_per_prompt": 2, "prompts": "0",
              "steps": 2, "dreambooth_steps": "1,2", "checkpoint": str(toy / "checkpoint"), "smoke": True}  # fmt: skip
    return EvalConfig(**{**values, **overrides})


@pytest.mark.parametrize("name", ["hyperlora_ft", "zero_ft", "coef_ft"])
def test_the_eval_method_tunes_in_place_and_restores_the_unet(toy, name):
    config = smoke_config(toy)
    world = ToyWorld(config)
    method, identity = make_method(name, config, world), world.identity(0)
    before = unet_state(world.pipe.unet)
    seeds = [eval_seed(0, identity["id"], 0, 0)]
    base = world.generate("a portrait of a person", seeds)
    images, timings = [], []
    with torch.no_grad():  # as run_evaluation calls it
        for variant, timing, generate in method.variants(identity):
            timings.append((variant, timing))
            images.append(generate(world.prompts[0], seeds))
    assert [v for v, _ in timings] == [f"{name}@1", f"{name}@2"]
    assert 0 < timings[0][1]["train_ms"] < timings[1][1]["train_ms"], "time is cumulative over steps"
    assert [t["dreambooth_steps"] for _, t in timings] == [1, 2]
    assert not np.array_equal(images[0], images[1]), "each step count scores its own LoRA"
    assert_same_unet(before, unet_state(world.pipe.unet))
    np.testing.assert_array_equal(world.generate("a portrait of a person", seeds), base)
    if name == "hyperlora_ft":
        assert timings[0][1]["total_ms"] > timings[0][1]["train_ms"] > 0, "its time includes the personalisation"
        assert UNTRAINED in method.label and method.plumbing_only


def test_eval_run_compares_both_inits_with_dreambooth(toy, tmp_path):
    args = ["--out", str(tmp_path), "--methods", "hyperlora_ft,zero_ft,dreambooth", "--smoke", "--prompts", "0",
            "--checkpoint", str(toy / "checkpoint")]  # fmt: skip
    assert eval_main(args) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["hyperlora_ft@1", "hyperlora_ft@2", "zero_ft@1", "zero_ft@2",
                                            "dreambooth@1", "dreambooth@2"]  # fmt: skip
    assert all(r["label"].startswith("PLUMBING, NOT RESULTS") for r in rows)
    assert all(r["personalize_train_ms"] > 0 and r["dreambooth_steps"] in (1, 2) for r in rows)
    assert all(np.isfinite(r["id_sim"]) for r in rows)


def test_coefficient_tuning_keeps_unit_tokens_moves_only_them_and_starts_at_the_generated_lora(toy_pipe, toy):
    result = toy_pipe.personalize(faces(toy), id_scale=0.85)
    toy_pipe.reset()
    model = toy_pipe.hyperlora
    coefficients = id_coefficients(model, result.features)
    bases = {k: v.clone() for k, v in model.state_dict().items()}
    unet = toy_pipe.pipe.unet
    before = unet_state(unet)
    batch = reference_batch(toy_pipe.pipe, faces(toy), toy_pipe.prompt_as_sent(INSTANCE_PROMPT), 64)
    config = FinetuneConfig(steps=8, lr=3e-2, scale=0.85)
    tuner = CoefficientFinetuner(unet, noise_scheduler(toy_pipe.pipe), batch, model, coefficients, config)
    for path, (down, up) in result.loras["id"].layers.items():  # step 0: the generated LoRA (the pipeline's is fp16)
        torch.testing.assert_close(tuner.lora.layers[path][0], down.float(), atol=1e-3, rtol=1e-2)
        torch.testing.assert_close(tuner.lora.layers[path][1], up.float(), atol=1e-3, rtol=1e-2)

    def fixed_noise_loss():
        with torch.no_grad():
            return np.mean([float(tuner.loss(torch.Generator().manual_seed(s))) for s in range(8)])

    start = fixed_noise_loss()
    tuner.train(8, progress=False)
    assert fixed_noise_loss() < start, "8 steps must lower the diffusion loss on the references"
    tokens = tuner.unit_coefficients
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(tokens.shape[:2]))
    assert not torch.allclose(tokens, coefficients), "the tokens moved"
    for key, value in model.state_dict().items():
        assert torch.equal(value, bases[key]), f"{key}: the bases and the resampler must not change"
    assert all(not p.requires_grad for p in model.parameters()) or all(p.grad is None for p in model.parameters())
    assert_same_unet(before, unet_state(unet))


def test_coefficient_tuning_refuses_a_batch_of_identities(toy_pipe):
    q, k = 8 * len(toy_pipe.hyperlora.targets), toy_pipe.hyperlora.config.hyper_dim
    with pytest.raises(ValueError, match=r"one identity's \[1, Q, K\]"):
        CoefficientFinetuner(toy_pipe.pipe.unet, None, {}, toy_pipe.hyperlora, torch.zeros(2, q, k), FinetuneConfig())


def test_dreambooth_leaves_plain_linears_so_a_later_method_can_hook_them(toy):
    """A run of dreambooth then hyperlora_ft on the next person failed: peft's wrappers outlived the adapter."""
    config = smoke_config(toy)
    world = ToyWorld(config)
    linears = {name for name, m in world.pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    method, identity = make_method("dreambooth", config, world), world.identity(0)
    with torch.no_grad():
        for _, _, generate in method.variants(identity):
            generate(world.prompts[0], [0])
    after = {name for name, m in world.pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert after == linears and not getattr(world.pipe.unet, "peft_config", None)
    tuned = make_method("hyperlora_ft", config, world)
    with torch.no_grad():
        for _, _, generate in tuned.variants(world.identity(1 % config.num_identities)):
            generate(world.prompts[0], [0])
