import pytest
import torch

from hyperlora.config import TOKENS_PER_MODULE
from hyperlora.resampler import normalize_coefficients

from .conftest import random_hyperlora, reference_features


def test_coefficients_are_unit_vectors_of_the_right_shape(unet):
    model = random_hyperlora(unet)
    coefficients = model.id_coefficients(**reference_features(model, 3), num_refs=1)
    assert coefficients.shape == (3, TOKENS_PER_MODULE * 24, model.config.hyper_dim)
    torch.testing.assert_close(coefficients.norm(dim=-1), torch.ones(3, 192))


def test_several_references_give_the_normalised_mean(unet):
    model = random_hyperlora(unet)
    features = reference_features(model, 4)
    together = model.id_coefficients(**features, num_refs=4)
    raw = []  # each reference's proj_out output, before normalisation
    model.resampler.proj_out.register_forward_hook(lambda m, i, o: raw.append(o))
    model.id_coefficients(**features, num_refs=1)
    expected = normalize_coefficients(raw[0].mean(dim=0, keepdim=True))
    torch.testing.assert_close(together, expected)


def test_one_image_repeated_equals_that_image_alone(unet):
    model = random_hyperlora(unet)
    one = reference_features(model, 1)
    repeated = {k: v.repeat(5, *([1] * (v.ndim - 1))) for k, v in one.items()}
    torch.testing.assert_close(model.id_coefficients(**repeated, num_refs=5), model.id_coefficients(**one))


def test_batches_of_samples_with_several_references_stay_separate(unet):
    model = random_hyperlora(unet)
    a, b = reference_features(model, 2, seed=1), reference_features(model, 2, seed=2)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    out = model.id_coefficients(**both, num_refs=2)
    torch.testing.assert_close(out[0:1], model.id_coefficients(**a, num_refs=2))
    torch.testing.assert_close(out[1:2], model.id_coefficients(**b, num_refs=2))


def test_assembly_follows_the_formula_and_token_layout(unet):
    model = random_hyperlora(unet)
    coefficients = normalize_coefficients(torch.randn(2, TOKENS_PER_MODULE * 24, model.config.hyper_dim))
    lora = model.assemble(coefficients, "id")
    m = 5  # module 5, layer to_v: tokens 8*5 + 4 (down) and 8*5 + 5 (up)
    target, layer = model.targets[m], model.lora_modules[m].to_v
    down, up = lora.layers[target.linear_path("to_v")]
    c_down, c_up = coefficients[1, 8 * m + 4], coefficients[1, 8 * m + 5]
    expected_down = sum(c_down[k] * layer.id_down_basis[k] for k in range(model.config.hyper_dim)).T
    expected_up = sum(c_up[k] * layer.id_up_basis[k] for k in range(model.config.hyper_dim)).T
    torch.testing.assert_close(down[1], expected_down)
    torch.testing.assert_close(up[1], expected_up)
    assert down.shape == (2, model.config.rank, target.in_features("to_v"))
    assert up.shape == (2, target.hidden_size, model.config.rank)
    assert lora.scale == 0.5


def test_base_branch_has_half_rank(unet):
    model = random_hyperlora(unet)
    features = reference_features(model, 1)
    loras = model.generate(**features, clip_blurred=features["clip"])
    assert loras["base"].rank == model.config.rank // 2 and loras["base"].alpha == model.config.base_rank / 2
    assert loras["id"].rank == model.config.rank


def test_a_fresh_hypernetwork_generates_a_zero_update(unet):
    from hyperlora import HyperLoRA, find_targets, preset

    model = HyperLoRA(preset("tiny"), find_targets(unet))
    with torch.no_grad():
        lora = model.generate(**reference_features(model, 1))["id"]
    assert all(float(up.abs().max()) == 0 for _, up in lora.layers.values())
    assert any(float(down.abs().max()) > 0 for down, _ in lora.layers.values())


def test_inputs_outside_the_configuration_are_rejected(unet):
    model = random_hyperlora(unet, encoder_types=["clip"])
    features = reference_features(model, 1)
    assert not hasattr(model, "id_projector")
    with pytest.raises(ValueError, match="arcface"):
        model.id_coefficients(**features)
    model.id_coefficients(clip=features["clip"])  # clip-only works end to end (unlike the release)
    with pytest.raises(ValueError, match="coefficients must be"):
        model.assemble(torch.zeros(1, 3, model.config.hyper_dim))
