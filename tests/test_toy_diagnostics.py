"""Diagnostics: the supervised ceiling learns from the renders; the probes read the shipped models."""

from pathlib import Path

import pytest

from hyperlora.toy.diagnostics import (CeilingConfig, attribute_ceiling, clip_linear_probe, shared_look_identity_level,
                                      vae_identity_breakdown)  # fmt: skip
from hyperlora.toy.identity import LOOK_ATTRIBUTES, PALETTE

TOY = Path(__file__).resolve().parents[1] / "data" / "toy"


def test_attribute_ceiling_learns_background_colour_in_a_few_steps():
    result = attribute_ceiling(CeilingConfig(num_train=60, images_per_identity=2, val_identities=20, val_per_identity=2,
                                             widths=(8, 16), steps=120, batch_size=32))  # fmt: skip
    assert set(result["accuracy"]) == set(LOOK_ATTRIBUTES) and result["n_val"] == 40
    assert result["accuracy"]["background_colour"] > 3 / len(PALETTE), result["accuracy"]


@pytest.mark.skipif(not (TOY / "clip" / "model_card.json").is_file(), reason="toy CLIP not shipped")
def test_linear_probe_reads_colours_from_the_shipped_clip():
    result = clip_linear_probe(TOY / "clip", num_train=100, steps=100)
    assert result["accuracy"]["clothing_colour"] >= 0.9 and result["accuracy"]["background_colour"] >= 0.9, result


@pytest.mark.skipif(not (TOY / "vae" / "model_card.json").is_file(), reason="toy VAE not shipped")
def test_vae_identity_breakdown_separates_content_from_alignment():
    result = vae_identity_breakdown(TOY / "vae", TOY / "faces", per_identity=1)
    assert result["n_images"] == 200
    # the same image re-cropped on nearby keypoints stays close; the reconstruction's content loses more
    assert result["alignment_only"] > result["shared_alignment"] > 0.5, result
    assert 0 < result["keypoint_shift_px"] < 2, result


@pytest.mark.skipif(not (TOY / "faces" / "recognizer.onnx").is_file(), reason="toy faces not shipped")
def test_different_people_sharing_a_look_stay_at_the_different_identity_level():
    result = shared_look_identity_level(TOY / "faces", num_looks=6, per_look=3)
    assert result["n_pairs"] == 18, "every render has a face"
    assert abs(result["shared_look_different_identity_mean"]) < 0.2, result



def test_nonsense_prefix_adds_rare_words_but_never_the_trigger_words():
    import numpy as np

    from hyperlora.toy.identity import nonsense_prefix

    rng = np.random.default_rng(0)
    out = [nonsense_prefix("a portrait of a person", rng, avoid="fcsks fxhks fhyks") for _ in range(200)]
    words = [o.split(", ")[0].split() for o in out]
    assert all(o.endswith(", a portrait of a person") for o in out)
    assert {len(w) for w in words} == {1, 2, 3} and all(4 <= len(x) <= 6 for w in words for x in w)
    assert not {"fcsks", "fxhks", "fhyks"} & {x for w in words for x in w}
    assert len({" ".join(w) for w in words}) > 190, "prefixes should vary"
