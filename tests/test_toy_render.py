"""The toy portrait renderer: determinism, ground truth geometry, splits, captions and looks."""

import dataclasses
import re

import numpy as np
import pytest

from hyperlora.toy.render import (
    LOOK_ATTRIBUTES, SPLITS, Look, caption, identity_params, is_held_out, render, render_dataset,
    render_sample, sample_look, split_identities, visible_attributes,
)

# insightface's 5-point template in a 112x112 crop (left eye, right eye, nose, left/right mouth corner).
ARCFACE_TEMPLATE = np.array([[38.29, 51.70], [73.53, 51.50], [56.03, 71.74], [41.55, 92.37], [70.73, 92.20]])


def _aligned_residual(points: np.ndarray, target: np.ndarray) -> float:
    """RMS distance after the best similarity transform of points onto target (Umeyama)."""
    src, dst = points - points.mean(0), target - target.mean(0)
    u, s, vt = np.linalg.svd(dst.T @ src)
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation, scale = u @ d @ vt, (s * np.diag(d)).sum() / (src**2).sum()
    return float(np.sqrt(((scale * src @ rotation.T - dst) ** 2).sum(1).mean()))


@pytest.mark.parametrize("size", [64, 96, 128])
def test_image_types_and_shapes(size):
    r = render_sample(3, 0, seed=0, size=size)
    assert r.image.dtype == np.uint8 and r.image.shape == (size, size, 3)
    assert r.mask.dtype == bool and r.mask.shape == (size, size)
    assert r.keypoints.dtype == np.float32 and r.keypoints.shape == (5, 2)
    assert len(r.box) == 4 and all(isinstance(v, float) for v in r.box)
    assert r.identity == 3 and isinstance(r.look, Look)


def test_same_inputs_give_byte_identical_renders():
    look = sample_look(np.random.default_rng(5))
    first = render(11, look, 64)
    identity_params.cache_clear()  # determinism must not come from the cache
    second = render(11, look, 64)
    assert first.image.tobytes() == second.image.tobytes(), "same (identity, look, size) must give the same bytes"
    assert np.array_equal(first.mask, second.mask) and np.array_equal(first.keypoints, second.keypoints)
    assert first.caption == second.caption and first.box == second.box
    a, b = render_sample(7, 2, seed=3), render_sample(7, 2, seed=3)
    assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption


def test_different_identities_differ_under_the_same_look():
    look = Look()
    images = [render(i, look, 64).image.astype(np.int16) for i in range(12)]
    for i in range(len(images)):
        for j in range(i):
            diff = np.abs(images[i] - images[j]).mean()
            assert diff > 1.0, f"identities {i} and {j} look nearly the same (mean |diff| {diff:.2f})"


def test_different_looks_of_one_identity_differ():
    a = render_sample(0, 0, seed=0).image.astype(np.int16)
    b = render_sample(0, 1, seed=0).image.astype(np.int16)
    assert np.abs(a - b).mean() > 5


@pytest.mark.parametrize("size", [64, 96, 128])
def test_keypoints_box_and_mask_agree(size):
    for index in range(60):
        r = render_sample(index, index, seed=1, size=size)
        x1, y1, x2, y2 = r.box
        kp = r.keypoints
        assert 0 <= x1 < x2 < size and 0 <= y1 < y2 < size, f"box {r.box} leaves the image"
        assert 0.3 < (x2 - x1) / size < 0.6, f"face box width {(x2 - x1) / size:.2f} of the image"
        assert ((kp[:, 0] > x1) & (kp[:, 0] < x2) & (kp[:, 1] > y1) & (kp[:, 1] < y2)).all(), "keypoint outside the box"
        cols, rows = np.round(kp).astype(int).T
        assert r.mask[rows, cols].all(), "the face mask must cover every keypoint"
        box_area = (x2 - x1) * (y2 - y1)
        assert r.mask.sum() > 0.7 * box_area, "the face mask should fill most of the face box"
        assert r.mask.sum() < 1.1 * box_area + 4 * (x2 - x1 + y2 - y1)
        assert kp[0, 0] < kp[1, 0] and kp[3, 0] < kp[4, 0], "left means image-left, as in insightface"
        assert kp[:2, 1].max() < kp[2, 1] < kp[3:, 1].min(), "eyes above nose above mouth"
        residual = _aligned_residual(kp, ARCFACE_TEMPLATE)
        assert residual < 9, f"keypoints fit the ArcFace template badly ({residual:.1f} px in 112)"


def test_yaw_moves_the_nose_towards_image_right():
    left, right = render(0, Look(yaw=-0.3), 64), render(0, Look(yaw=0.3), 64)
    assert right.keypoints[2, 0] - left.keypoints[2, 0] > 3
    assert np.array_equal(left.mask, render(0, Look(yaw=-0.3), 64).mask)


def test_splits_are_disjoint_and_large_enough():
    train, val, test = (set(SPLITS[name]) for name in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(test) >= 100 and len(val) >= 100 and len(train) >= 1000
    assert all(is_held_out(i) for i in val | test) and not any(is_held_out(i) for i in train)
    big = split_identities("train", num_train=900_000)
    assert big.stop <= min(split_identities("val").start, split_identities("test").start)
    with pytest.raises(ValueError, match="num_train"):
        split_identities("train", num_train=900_001)
    with pytest.raises(ValueError, match="split"):
        split_identities("holdout")


def test_captions_name_the_look_and_never_the_identity():
    for identity in list(SPLITS["train"][:20]) + list(SPLITS["test"][:20]):
        rng = np.random.default_rng(identity)
        look = sample_look(rng)
        text = caption(look, identity_params(identity), rng, identity_prob=0.5)
        assert not re.search(r"\d", text), f"caption names a number: {text!r}"
        for name, value in visible_attributes(look).items():
            if value != "none":
                assert value in text, f"{name}={value!r} missing from {text!r}"
        if look.hairstyle == "bald":
            assert "hair" not in text and "bald" in text


@pytest.mark.parametrize("prob, mentioned", [(0.0, False), (1.0, True)])
def test_caption_identity_traits_follow_the_probability(prob, mentioned):
    params = identity_params(42)
    text = caption(Look(), params, np.random.default_rng(0), identity_prob=prob)
    assert (f"{params.skin_tone} skin" in text) == mentioned and (f"{params.iris_colour} eyes" in text) == mentioned


@pytest.mark.parametrize("hairstyle", [s for s in LOOK_ATTRIBUTES["hairstyle"] if s != "bald"])
def test_explicit_hair_colour_shows_in_caption_and_pixels(hairstyle):
    red = render(5, Look(hairstyle=hairstyle, hair_colour="red", background_colour="white"), 64)
    blue = render(5, Look(hairstyle=hairstyle, hair_colour="blue", background_colour="white"), 64)
    assert "red" in red.caption and "blue" in blue.caption
    x1, y1, x2, y2 = red.box
    row, col = int(y1 - 0.12 * (y2 - y1)), int((x1 + x2) / 2)  # above the forehead: hair
    r, g, b = red.image[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3).mean(0)
    assert r > g + 60 and r > b + 60, f"hair should look red, got {(r, g, b)}"
    r, g, b = blue.image[row - 1:row + 2, col - 1:col + 2].reshape(-1, 3).mean(0)
    assert b > r + 60 and b > g + 40, f"hair should look blue, got {(r, g, b)}"


@pytest.mark.parametrize("colour, channel", [("red", 0), ("green", 1), ("blue", 2)])
def test_explicit_clothing_colour_shows_in_pixels(colour, channel):
    r = render(8, Look(clothing_colour=colour, background_colour="white"), 64)
    patch = r.image[-6:, 4:12].reshape(-1, 3).mean(0)  # lower-left: the shoulder
    assert patch.argmax() == channel and f"{colour} t-shirt" in r.caption


def test_look_validates_values_and_fixing_keeps_other_draws():
    with pytest.raises(ValueError, match="hair_colour"):
        Look(hair_colour="purple")
    free, fixed = sample_look(np.random.default_rng(9)), sample_look(np.random.default_rng(9), hair_colour="red")
    assert fixed.hair_colour == "red"
    assert dataclasses.replace(free, hair_colour="red") == fixed
    with pytest.raises(ValueError, match="unknown"):
        sample_look(np.random.default_rng(0), hat="fedora")
    assert "hair_colour" not in visible_attributes(Look(hairstyle="bald"))
    assert "glasses_colour" not in visible_attributes(Look(glasses="none"))


def test_render_dataset_is_ordered_and_reproducible():
    items = list(render_dataset([3, 4], n_per_identity=2, seed=1, size=64))
    assert [r.identity for r in items] == [3, 3, 4, 4]
    assert items[3].image.tobytes() == render_sample(4, 1, seed=1, size=64).image.tobytes()
    assert items[0].look != items[1].look


def test_identity_params_reject_bad_ids_and_sizes():
    with pytest.raises(ValueError, match="identity"):
        identity_params(-1)
    with pytest.raises(ValueError, match="size"):
        render(0, Look(), size=16)
