import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperlora.conditioning.faces import ModelFilesMissingError, NoFaceError, SeveralFacesError, box_iou
from hyperlora.toy.face_backend import ToyFaceAnalyzer
from hyperlora.toy.face_detector import (
    INPUT_SIZE, DegradeConfig, DetectorTrainConfig, FaceDetector, TinyDetector, degrade, faceless, positive_matrix,
    sample_batch, render_pool,
)
from hyperlora.toy.face_scan import scan
from hyperlora.toy.face_recognizer import RecognizerTrainConfig, arcface_logits, load_recognizer, to_pixels
from hyperlora.toy.faces import FaceEvalConfig, evaluate_faces, load_weights, train_detector, train_recognizer
from hyperlora.toy.render import render_sample, split_identities


def test_pixel_batches_are_contiguous_for_the_conv_backward():
    """A channels-last (permuted) batch sent oneDNN's conv backward-weights into heap corruption on an AVX2 CPU."""
    crops = [np.full((112, 112, 3), v, dtype=np.uint8) for v in (0, 255)]
    pixels = to_pixels(crops)
    assert pixels.is_contiguous() and pixels.shape == (2, 3, 112, 112)
    assert pixels.min() == -1.0 and pixels.max() == 1.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Both smoke models, trained for 3 steps and exported to ONNX."""
    folder = tmp_path_factory.mktemp("toy_faces")
    train_detector(DetectorTrainConfig.smoke(), folder)
    train_recognizer(RecognizerTrainConfig.smoke(), folder)
    return folder


@pytest.fixture
def render():
    return render_sample(split_identities("test")[0], 0, seed=3)


def test_recognizer_loads_through_insightface_as_a_recognition_model(model_dir, render):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils.face_align import norm_crop

    model = load_recognizer(model_dir / "recognizer.onnx")
    assert isinstance(model, ArcFaceONNX) and model.taskname == "recognition"
    assert model.input_size == (112, 112) and not isinstance(model.input_shape[0], int), "batch must be dynamic"
    assert (model.input_mean, model.input_std) == (127.5, 127.5), "normalisation happens outside the graph"
    crop = norm_crop(np.ascontiguousarray(render.image[:, :, ::-1]), render.keypoints)
    assert model.get_feat([crop, crop]).shape == (2, RecognizerTrainConfig.smoke().embedding_dim)


def test_detector_finds_one_face_and_answers_in_pixels_at_any_size(model_dir, render):
    detector = FaceDetector(model_dir / "detector.onnx", threshold=0.0)
    (small,) = detector.detect(render.image)
    assert small.box.shape == (4,) and small.kps.shape == (5, 2) and 0.0 <= small.score <= 1.0
    doubled = np.repeat(np.repeat(render.image, 2, axis=0), 2, axis=1)  # resized back to 64 px it is the same image
    (large,) = detector.detect(doubled)
    np.testing.assert_allclose(large.kps, (small.kps + 0.5) * 2 - 0.5, atol=1e-3)
    np.testing.assert_allclose(large.box, (small.box + 0.5) * 2 - 0.5, atol=1e-3)
    assert FaceDetector(model_dir / "detector.onnx", threshold=1.01).detect(render.image) == []


def test_checkpoint_reloads_and_matches_the_onnx_file(model_dir, render):
    saved_config, state = load_weights(model_dir / "detector.safetensors")
    config = DetectorTrainConfig(**saved_config)
    model = TinyDetector(width=config.width, hidden=config.hidden)
    model.load_state_dict(state)
    pixels = torch.from_numpy(render.image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        out = model.eval()(pixels)[0].numpy()
    (found,) = FaceDetector(model_dir / "detector.onnx", threshold=0.0).detect(render.image)
    np.testing.assert_allclose(found.kps.ravel(), out[4:14] * INPUT_SIZE - 0.5, atol=1e-3)
    record = json.loads((model_dir / "detector_train.json").read_text())
    assert record["config"]["steps"] == 3 and record["history"]["train_seconds"] > 0 and "git_commit" in record


def test_analyzer_returns_faces_with_normalised_embeddings(model_dir, render):
    analyzer = ToyFaceAnalyzer(model_dir=model_dir, det_threshold=0.0)
    image = Image.fromarray(render.image)
    (face,) = analyzer.detect(image)
    assert face.embedding.shape == (analyzer.embedding_dim,) == (RecognizerTrainConfig.smoke().embedding_dim,)
    assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(analyzer.embed(image, face), face.embedding, atol=1e-6)


def test_missing_model_files_name_the_file_the_folder_and_the_build_command(tmp_path):
    with pytest.raises(ModelFilesMissingError, match="detector.onnx") as error:
        ToyFaceAnalyzer(model_dir=tmp_path)
    assert str(tmp_path.resolve()) in str(error.value) and "python -m hyperlora.toy build" in str(error.value)
    with pytest.raises(FileNotFoundError, match="toy face model"):
        evaluate_faces(tmp_path)


def test_evaluation_writes_the_card_and_the_cosine_plot(model_dir):
    result = evaluate_faces(model_dir, FaceEvalConfig(identities=3, images_per_identity=2))
    card = json.loads((model_dir / "model_card.json").read_text())
    assert set(card["gates"]) == set(result["gates"]) and card["passed"] is False, "3 training steps pass no gate"
    assert set(card["config"]) == {"detector", "recognizer", "evaluation"} and card["train_seconds"] > 0
    assert 0.0 <= card["figures"]["detection"]["detection_rate"] <= 1.0
    assert (model_dir / "cosine_distributions.png").stat().st_size > 1000


def test_arcface_margin_only_lowers_the_true_class_logit():
    g = torch.Generator().manual_seed(0)
    embeddings, weight = torch.randn(4, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    plain = arcface_logits(embeddings, weight, labels, 30.0, 0.0)
    margin = arcface_logits(embeddings, weight, labels, 30.0, 0.3)
    cosine = torch.nn.functional.normalize(embeddings) @ torch.nn.functional.normalize(weight).T
    torch.testing.assert_close(plain, 30 * cosine)
    true = torch.arange(4), labels
    assert (margin[true] < plain[true]).all(), "the margin makes the true class harder"
    margin[true] = plain[true]
    torch.testing.assert_close(margin, plain)


def test_augmentation_keeps_faces_inside_and_negatives_faceless():
    config = DetectorTrainConfig.smoke(batch_size=32, negative_fraction=0.5)
    pool = render_pool(range(4), 1, seed=0, size=64, progress=False)
    rng = np.random.default_rng(0)
    for box in pool.boxes:
        for _ in range(20):
            matrix = positive_matrix(box, 64, rng, config)
            corners = box.reshape(2, 2) @ matrix[:, :2].T + matrix[:, 2]
            assert (corners >= -0.5).all() and (corners <= INPUT_SIZE - 0.5).all()
    batch = sample_batch(pool, rng, config)
    assert batch["pixels"].shape == (32, 3, 64, 64) and 0 < batch["labels"].sum() < 32
    r = render_sample(0, 0, seed=0)
    painted = faceless(r)
    assert (painted[r.mask] != r.image[r.mask]).any(axis=-1).mean() > 0.5, "the face is painted over"
    assert (painted[0] == r.image[0]).all(), "the top row (wall) is unchanged"


def test_command_line_flags_are_config_fields(tmp_path):
    from hyperlora.toy.faces import main

    assert main(["--out", str(tmp_path), "--smoke", "--stages", "detector", "--detector.steps", "2",
                 "--detector.zoom", "[1.0, 1.2]"]) == 0  # fmt: skip
    config = json.loads((tmp_path / "detector_train.json").read_text())["config"]
    assert config["steps"] == 2 and config["zoom"] == [1.0, 1.2]
    assert config["width"] == DetectorTrainConfig.smoke().width, "--smoke is the starting point"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--detector.no_such_field", "1"])


# ---------------------------------------------------------------- several faces: the shipped detector, scanned

SHIPPED_FACES = Path(__file__).resolve().parents[1] / "data" / "toy" / "faces"
shipped = pytest.mark.skipif(not (SHIPPED_FACES / "detector.onnx").is_file(), reason="toy face models not shipped")


def two_up(size: int, *, square: bool = False, right_size: int | None = None):
    """Two test-identity renders side by side (the right one at right_size, centred in height), optionally in the
    middle band of a square grey canvas; returns the image and both true face boxes."""
    people = split_identities("test")
    left, right = render_sample(people[0], 0, seed=3, size=size), render_sample(people[1], 0, seed=3, size=right_size or size)
    small = right.image.shape[0]
    image = np.full((size, size + small, 3), 128, np.uint8)
    top = (size - small) // 2
    image[:, :size], image[top : top + small, size:] = left.image, right.image
    boxes = [np.array(left.box), np.array(right.box) + [size, top, size, top]]
    if square:
        canvas = np.full((size + small, size + small, 3), 128, np.uint8)
        shift = small // 2
        canvas[shift : shift + size] = image
        image, boxes = canvas, [box + [0, shift, 0, shift] for box in boxes]
    return image, boxes


@shipped
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("square", [False, True], ids=["wide", "square"])
def test_two_faces_side_by_side_are_both_found(size, square):
    image, truth = two_up(size, square=square)
    analyzer = ToyFaceAnalyzer()
    faces = analyzer.detect(Image.fromarray(image))
    assert len(faces) == 2, [face.bbox.round() for face in faces]
    for box in truth:
        assert max(box_iou(face.bbox, box) for face in faces) > 0.6, f"true face {box.round()} not found"
    assert len(ToyFaceAnalyzer(scan_windows=False).detect(Image.fromarray(image))) <= 1, "the detector alone"
    whole = analyzer.detector.detect_batch([image])[0]
    if square:  # the problem scanning solves: the whole image gives one confident box across both faces
        assert whole.score > 0.5 and all(box_iou(whole.box, box) < 0.5 for box in truth)
    else:  # or no face at all
        assert whole.score < 0.5


@shipped
def test_two_faces_of_similar_size_are_refused_unless_picked_and_a_smaller_one_is_warned_about():
    analyzer = ToyFaceAnalyzer()
    image, truth = two_up(128)
    with pytest.raises(SeveralFacesError, match=r"two.png: found 2 faces, 2 of similar size.*pass pick=<index>"):
        analyzer.analyze_reference(Image.fromarray(image), name="two.png", min_face_size=16)
    for pick in (0, 1):
        face, warnings = analyzer.analyze_reference(Image.fromarray(image), pick=pick, name="two.png", min_face_size=16)
        assert "two.png: found 2 faces (face 0: " in warnings[0] and f"using face {pick}" in warnings[0]
    image, truth = two_up(128, right_size=64)
    face, warnings = analyzer.analyze_reference(Image.fromarray(image), name="pair.png", min_face_size=16)
    assert box_iou(face.bbox, truth[0]) > 0.6, "the largest face"
    assert len(warnings) == 1 and warnings[0].startswith("pair.png: found 2 faces (face ")
    assert "using face" in warnings[0] and "chosen by pick='largest'" in warnings[0]


@shipped
def test_scanning_leaves_single_face_renders_exactly_as_the_detector_sees_them():
    detector = FaceDetector(SHIPPED_FACES / "detector.onnx")
    rng = np.random.default_rng(0)
    for k, person in enumerate(split_identities("val")[:36]):
        image = render_sample(person, k, seed=5, size=(64, 128, 256)[k % 3]).image
        image = degrade(image, rng, DegradeConfig()) if k % 2 else image
        (alone,) = detector.detect(image)
        found = scan(detector, image, threshold=0.5)
        assert len(found.faces) == 1 and found.faces[0] is not None
        np.testing.assert_array_equal(found.faces[0].box, alone.box)


@shipped
def test_no_face_message_says_what_the_detector_saw():
    painted = faceless(render_sample(split_identities("test")[0], 0, seed=3, size=128))
    with pytest.raises(NoFaceError, match=r"wall.png: no face found \(the toy ONNX detector on the image and on square "
                                          r"windows.*best face score on the whole image is 0.0\d.*crop it to one whole "
                                          r"face"):  # fmt: skip
        ToyFaceAnalyzer().analyze_reference(Image.fromarray(painted), name="wall.png")


@shipped
def test_a_two_person_reference_is_skipped_with_its_reason_and_used_when_picked():
    from hyperlora.conditioning.clip_features import ClipImageEncoder
    from hyperlora.conditioning.references import Conditioner, ReferencePhotoWarning

    clip = ClipImageEncoder(SHIPPED_FACES.parent / "clip", world="toy")
    single = render_sample(split_identities("test")[2], 0, seed=3).image
    pair, _ = two_up(64)
    with pytest.warns(ReferencePhotoWarning, match=r"skipping reference image 1 \(<array 64x128x3 uint8>\): found 2 "):
        features = Conditioner(ToyFaceAnalyzer(), clip, min_face_size=8.0)([single, pair])
    assert features.sources == ["image 0 (<array 64x64x3 uint8>)"]
    assert features.failures["image 1 (<array 64x128x3 uint8>)"].startswith("found 2 faces, 2 of similar size")
    with pytest.warns(ReferencePhotoWarning, match=r"found 2 faces \(face 0: .*using face 1, chosen by pick=1"):
        picked = Conditioner(ToyFaceAnalyzer(), clip, min_face_size=8.0, pick=1)([pair])
    assert picked.num_refs == 1 and picked.failures == {}
