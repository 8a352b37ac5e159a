"""Slider math on a tiny random HyperLoRA and random features: interpolation, concept directions, grids, widgets."""

import numpy as np
import pytest
import torch
from PIL import Image

from hyperlora.lora import InPlaceFusion
from hyperlora.pipeline import HyperLoRAPipeline
from hyperlora.sliders import (
    concept_terms,
    fused_image,
    interpolate_coefficients,
    interpolation_path,
    slider_demo,
    slider_grid,
)

from .conftest import random_hyperlora, reference_features


def people(model, n: int) -> list[dict]:
    """Coefficients of n random people, two reference images each."""
    with torch.no_grad():
        return [model.coefficients(**reference_features(model, 2, seed=s), num_refs=2) for s in range(n)]


def assert_same_lora(got, expected, message):
    """Equal up to float rounding: the coefficients are equal bit for bit (tested), but a LoRA assembled in a batch of
    three may round differently from one assembled alone (the CPU's matmul kernel depends on the batch)."""
    for path, (down, up) in expected.layers.items():
        for tensor, want in ((got.layers[path][0], down), (got.layers[path][1], up)):
            torch.testing.assert_close(tensor, want, rtol=1e-5, atol=1e-7, msg=f"{message}: {path}")


def test_interpolation_endpoints_are_the_two_peoples_loras_exactly(unet):
    model = random_hyperlora(unet)
    a, b = (p["id"] for p in people(model, 2))
    assert torch.equal(interpolate_coefficients(a, b, 0.0), a) and torch.equal(interpolate_coefficients(a, b, 1.0), b)
    with torch.no_grad():
        path = interpolation_path(model, a, b, [0.0, 0.5, 1.0])
        assert path.batch_size == 3
        assert_same_lora(path.select(0), model.assemble(a), "t = 0 must be person A's LoRA")
        assert_same_lora(path.select(2), model.assemble(b), "t = 1 must be person B's LoRA")


def test_midway_tokens_have_the_models_norm(unet):
    model = random_hyperlora(unet)
    a, b = (p["id"] for p in people(model, 2))
    midway = interpolate_coefficients(a, b, 0.5)
    torch.testing.assert_close(midway.norm(dim=-1), a.norm(dim=-1))
    torch.testing.assert_close(midway.norm(dim=-1), torch.ones(midway.shape[:2]))
    assert float((0.5 * a + 0.5 * b).norm(dim=-1).min()) < 0.99, "the plain average is shorter: renormalising matters"
    assert not torch.allclose(midway, a) and not torch.allclose(midway, b)
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate_coefficients(a, b[:, :8], 0.5)


def test_concept_weight_zero_equals_the_unmodified_lora(unet):
    model = random_hyperlora(unet)
    with torch.no_grad():
        third, neutral, smiling = (model.assemble(p["id"]) for p in people(model, 3))
    fusion = InPlaceFusion(unet)

    def fused(terms):
        fusion.fuse([lora for lora, _ in terms], [w for _, w in terms])
        weights = {path: unet.get_submodule(path).weight.clone() for path in third.layers}
        fusion.restore()
        return weights

    plain = fused([(third, 0.8)])
    zero = fused(concept_terms(third, smiling, neutral, 0.0, scale=0.8))
    assert all(torch.equal(zero[path], plain[path]) for path in plain), "weight 0 must fuse the LoRA alone"
    one = fused(concept_terms(third, smiling, neutral, 1.5, scale=0.8))
    path = next(iter(third.layers))
    base = plain[path] - 0.8 * third.delta(path)
    expected = base + 0.8 * (third.delta(path) + 1.5 * (smiling.delta(path) - neutral.delta(path)))
    torch.testing.assert_close(one[path], expected, rtol=1e-4, atol=1e-5)


def tile(**values) -> Image.Image:
    """A fake render: a 4 x 4 image whose red channel holds the first value x 100, green the second."""
    v = list(values.values()) + [0.0]
    return Image.fromarray(np.full((4, 4, 3), [int(v[0] * 100), int(v[1] * 100), 0], dtype=np.uint8))


def test_grid_has_one_image_per_combination():
    grid = slider_grid(tile, id_weight=[0.0, 0.5, 1.0], base_weight=[0.0, 0.25])
    assert grid.shape == (3, 2) and grid.names == ["id_weight", "base_weight"]
    assert np.asarray(grid.images[2][1])[0, 0].tolist() == [100, 25, 0], "rows: the first slider; columns: the second"
    single = slider_grid(tile, t=[0, 0.25, 0.5, 0.75, 1])
    assert single.shape == (1, 5) and np.asarray(single.images[0][3])[0, 0, 0] == 75
    fig = grid.figure("test")
    assert len(fig.axes) == 6
    with pytest.raises(ValueError, match="one or two sliders"):
        slider_grid(tile, a=[0], b=[0], c=[0])


def test_widget_demo_rerenders_when_a_slider_moves():
    pytest.importorskip("ipywidgets")
    calls = []
    panel = slider_demo(lambda **v: calls.append(v) or tile(**v), t=(0.0, 1.0, 0.1, 0.5), w=(-1.0, 1.0, 0.5, 0.0))
    assert calls == [{"t": 0.5, "w": 0.0}], "rendered once when built"
    slider, image = panel.children[0], panel.children[-1]
    slider.value = 0.8
    assert calls[-1] == {"t": 0.8, "w": 0.0} and bytes(image.value).startswith(b"\x89PNG")


def test_fused_image_restores_the_base_model(pipe):
    model = random_hyperlora(pipe.unet, id_embed_dim=128)
    hyper_pipe = HyperLoRAPipeline(pipe, model, conditioner=None)
    with torch.no_grad():
        third, neutral, smiling = (model.assemble(p["id"]) for p in people(model, 3))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    def image(terms):
        return np.asarray(fused_image(hyper_pipe, terms, "a portrait", seed=0, num_inference_steps=2))

    plain = image([(third, 1.0)])
    assert np.array_equal(image(concept_terms(third, smiling, neutral, 0.0)), plain)
    assert not np.array_equal(image(concept_terms(third, smiling, neutral, 2.0)), plain)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items()), "base weights restored"


def _point(folder, name, a, b, t=(0.0, 0.5, 1.0)):
    import json

    (folder / name).mkdir(parents=True)
    summary = {"untrained": False, "interpolation": {"t": list(t), "id_sim_a": a, "id_sim_b": b}}
    (folder / name / "summary.json").write_text(json.dumps(summary))


def test_the_interpolation_sweep_averages_pairs_and_refuses_what_is_not_notebook_8(tmp_path):
    from eval.slider_sweep import interpolation_table, main

    _point(tmp_path, "p1", [0.4, 0.2, 0.0], [0.0, 0.1, 0.2])
    _point(tmp_path, "p2", [0.2, 0.2, 0.2], [0.2, 0.3, 0.6])
    (tmp_path / "failed_point").mkdir()  # a failed point has no summary.json: skipped
    table = interpolation_table(tmp_path)
    assert table["pairs"] == ["p1", "p2"]
    assert table["id_sim_a"] == pytest.approx([0.3, 0.2, 0.1]) and table["id_sim_b"] == pytest.approx([0.1, 0.2, 0.4])
    assert table["id_sim_a_sem"][0] == pytest.approx(0.1)  # std 0.1414 over sqrt(2)
    assert table["b_minus_a"] == pytest.approx([-0.2, 0.0, 0.3])
    assert table["monotonic_a"] and table["monotonic_b"]
    assert main([str(tmp_path), "--out", str(tmp_path / "f.png")]) == 0 and (tmp_path / "f.png").is_file()
    _point(tmp_path, "p3", [0.1, 0.1], [0.1, 0.1], t=(0.0, 1.0))
    with pytest.raises(ValueError, match="different t"):
        interpolation_table(tmp_path)
    assert main([str(tmp_path / "failed_point")]) == 2  # no summaries at all: a clear error, exit 2
