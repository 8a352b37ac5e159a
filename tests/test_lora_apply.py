import copy

import pytest
import torch

from hyperlora import functional_lora, load_into_diffusers
from hyperlora.config import TOKENS_PER_MODULE

from .conftest import random_hyperlora, reference_features


def _run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.fixture
def loras(unet):
    model = random_hyperlora(unet)
    features = reference_features(model, 1)
    with torch.no_grad():
        return model.generate(**features, clip_blurred=features["clip"] + 1)


def test_zero_coefficients_leave_the_unet_unchanged(unet, inputs):
    model = random_hyperlora(unet)
    zero = model.assemble(torch.zeros(1, TOKENS_PER_MODULE * 24, model.config.hyper_dim))
    base = _run(unet, inputs)
    with functional_lora(unet, [zero], [1.0]):
        torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0)


def test_scale_zero_equals_the_base_model_and_nonzero_changes_it(unet, inputs, loras):
    base = _run(unet, inputs)
    with functional_lora(unet, [loras["id"]], [0.0]):
        torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0, msg="LoRA + 0 scale should equal no LoRA")
    with functional_lora(unet, [loras["id"]], [1.0]):
        assert (_run(unet, inputs) - base).abs().max() > 1e-3, "a non-zero LoRA should change the output"
    torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0, msg="hooks must be removed on exit")


def test_functional_equals_merged_weights(unet, inputs, loras):
    """The hook adds exactly scale * (alpha / r) * B @ A to every target weight."""
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for branch, scale in (("id", 0.8), ("base", 0.3)):
            for path in loras[branch].layers:
                modules[path].weight += scale * loras[branch].delta(path)
    with functional_lora(unet, [loras["id"], loras["base"]], [0.8, 0.3]):
        out = _run(unet, inputs)
    torch.testing.assert_close(out, _run(merged, inputs), rtol=1e-4, atol=1e-5)


def test_per_sample_scales_switch_branches_sample_by_sample(unet, inputs, loras):
    with functional_lora(unet, [loras["id"]], [torch.tensor([1.0, 0.0])]):
        mixed = _run(unet, inputs)
    with functional_lora(unet, [loras["id"]], [1.0]):
        on = _run(unet, inputs)
    base = _run(unet, inputs)
    torch.testing.assert_close(mixed[0], on[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-6)


def test_each_sample_gets_its_own_lora(unet, inputs):
    model = random_hyperlora(unet)
    with torch.no_grad():
        both = model.generate(**reference_features(model, 2))["id"]
    with functional_lora(unet, [both], [1.0]):
        batched = _run(unet, inputs)
    for i in range(2):
        single = {k: v[i : i + 1] if torch.is_tensor(v) and v.ndim else v for k, v in inputs.items()}
        single["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in inputs["added_cond_kwargs"].items()}
        with functional_lora(unet, [both.select(i)], [1.0]):
            torch.testing.assert_close(batched[i : i + 1], _run(unet, single), rtol=1e-4, atol=1e-5)


def test_gradients_reach_the_hypernetwork_and_not_the_unet(unet, inputs):
    model = random_hyperlora(unet)
    features = reference_features(model, 2)
    loras = model.generate(**features, clip_blurred=features["clip"])
    with functional_lora(unet, [loras["id"], loras["base"]], [1.0, 1.0]):
        unet(**inputs).sample.square().mean().backward()
    assert all(p.grad is None for p in unet.parameters()), "the UNet must stay frozen"
    for name in ("resampler.latents", "resampler.proj_in.weight", "resampler.proj_in_2.weight",
                 "id_projector.0.weight", "base_resampler.latents", "lora_modules.0.to_q.id_down_basis",
                 "lora_modules.3.to_out.base_up_basis"):  # fmt: skip
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"


def test_diffusers_adapters_and_fusing_match_the_functional_lora(unet, inputs, loras):
    scales = {"id": 0.8, "base": 0.4}
    with functional_lora(unet, [loras["id"], loras["base"]], [scales["id"], scales["base"]]):
        expected = _run(unet, inputs)
    names = load_into_diffusers(unet, loras, scales)
    assert names == ["hyperlora_id", "hyperlora_base"]
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5, msg="PEFT adapters")
    unet.fuse_lora(adapter_names=names)
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5, msg="fused")


def test_pipeline_load_lora_weights_set_adapters_and_fuse(pipe, loras):
    def generate():
        return pipe("a portrait", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    base = generate()
    with functional_lora(pipe.unet, [loras["id"], loras["base"]], [0.9, 0.5]):
        expected = generate()
    assert abs(expected - base).max() > 1e-4
    load_into_diffusers(pipe, loras, {"id": 0.9, "base": 0.5}, fuse=True)
    torch.testing.assert_close(torch.from_numpy(generate()), torch.from_numpy(expected), rtol=1e-3, atol=1e-4)
    pipe.unfuse_lora()
    load_into_diffusers(pipe, loras, {"id": 0.0, "base": 0.0})  # reload replaces the adapters
    torch.testing.assert_close(torch.from_numpy(generate()), torch.from_numpy(base), rtol=1e-4, atol=1e-5)


def test_lora_for_another_unet_is_rejected(unet, loras):
    from hyperlora.worlds.sdxl import build_unet

    with pytest.raises((KeyError, ValueError), match="down_blocks"):
        with functional_lora(build_unet("mid"), [loras["id"]], [1.0]):
            pass


def test_in_place_fusion_matches_and_restores_exactly(unet, inputs, loras):
    from hyperlora.lora import InPlaceFusion

    base = _run(unet, inputs)
    with functional_lora(unet, [loras["id"], loras["base"]], [0.8, 0.4]):
        expected = _run(unet, inputs)
    fusion = InPlaceFusion(unet)
    fusion.fuse([loras["id"], loras["base"]], [0.8, 0.4])
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5)
    fusion.fuse([loras["id"]], [0.0])  # fusing again starts from the base weights
    torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0)
    fusion.fuse([loras["id"]], [1.0])
    fusion.restore()
    torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0, msg="restore must be exact")
    # the copies of the base weights are taken once and reused by every later fuse
    copies = {path: weight.data_ptr() for path, weight in fusion.backup.items()}
    fusion.fuse([loras["base"]], [0.5])
    fusion.fuse([loras["id"], loras["base"]], [0.8, 0.4])
    assert {path: weight.data_ptr() for path, weight in fusion.backup.items()} == copies
    torch.testing.assert_close(_run(unet, inputs), expected, rtol=1e-4, atol=1e-5)
    fusion.forget()
    assert not fusion.backup and not fusion.fused
    torch.testing.assert_close(_run(unet, inputs), base, rtol=0, atol=0, msg="forget restores first")
