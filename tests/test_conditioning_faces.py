"""Face analysis: the Face record, reference checks, antelopev2's errors and retries, dlib on real photos."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from hyperlora.conditioning.backends import face_backend
from hyperlora.conditioning import (
    FACE_BACKENDS,
    DlibAnalyzer,
    Face,
    FaceAnalyzer,
    FaceTooSmallError,
    InsightFaceAnalyzer,
    ModelFilesMissingError,
    NoFaceError,
    SeveralFacesError,
    arcface_embedding,
    cosine_similarity,
    id_condition,
    load_image,
    make_face_analyzer,
)
from hyperlora.conditioning.crops import clip_square
from hyperlora.conditioning.insightface_backend import ANTELOPEV2_FILES, ANTELOPEV2_URL


def box_face(x0, y0, size, score=0.9):
    kps = [[x0 + 0.3 * size, y0 + 0.4 * size], [x0 + 0.7 * size, y0 + 0.4 * size], [x0 + 0.5 * size, y0 + 0.6 * size],
           [x0 + 0.35 * size, y0 + 0.8 * size], [x0 + 0.65 * size, y0 + 0.8 * size]]  # fmt: skip
    return Face(bbox=[x0, y0, x0 + size, y0 + size], score=score, kps=kps)


class ListAnalyzer(FaceAnalyzer):
    """Returns fixed faces; embeds a face as its one-hot score position."""

    name, embedding_dim = "list", 4

    def __init__(self, faces):
        self.faces = faces

    @property
    def search_description(self):
        return "a fixed list"

    def detect(self, image):
        return list(self.faces)

    def embed(self, image, face):
        return np.eye(4, dtype=np.float32)[self.faces.index(face) % 4]


# ---------------------------------------------------------------- the record and the reference checks


def test_face_validates_shapes_and_normalises_embeddings():
    face = Face(bbox=[0, 0, 10, 20], score=1, kps=np.zeros((5, 2)), embedding=[3.0, 4.0])
    assert face.embedding.tolist() == pytest.approx([0.6, 0.8])
    assert (face.width, face.height, face.area) == (10, 20, 200)
    with pytest.raises(ValueError, match=r"kps must have shape \[5, 2\]"):
        Face(bbox=[0, 0, 1, 1], score=1, kps=np.zeros((68, 2)))
    with pytest.raises(ValueError, match="landmarks_106"):
        Face(bbox=[0, 0, 1, 1], score=1, kps=np.zeros((5, 2)), landmarks_106=np.zeros((68, 2)))


def colour_noise(width, height, seed=0):
    """A colourful, well-lit photo stand-in: no grayscale, dark or low-contrast warning."""
    return Image.fromarray(np.random.default_rng(seed).integers(60, 255, (height, width, 3), dtype=np.uint8))


def test_reference_with_several_faces_uses_the_largest_and_says_so():
    faces = [box_face(0, 0, 100, 0.99), box_face(200, 0, 300, 0.8), box_face(600, 0, 150, 0.7)]
    analyzer, image = ListAnalyzer(faces), colour_noise(1000, 400)
    face, warnings = analyzer.analyze_reference(image, name="group.jpg")
    assert face.bbox[0] == 200 and face.embedding.tolist() == [0, 1, 0, 0]
    assert len(warnings) == 1 and "group.jpg: found 3 faces (face 0: 100x100 px at (0, 0), score 0.99;" in warnings[0]
    assert "face 2: 150x150 px at (600, 0), score 0.70); using face 1, chosen by pick='largest'" in warnings[0]
    assert analyzer.analyze_reference(image, pick="best")[0].bbox[0] == 0
    assert analyzer.analyze_reference(image, pick=2)[0].bbox[0] == 600
    with pytest.raises(NoFaceError, match="pick=3 but only 3 face"):
        analyzer.analyze_reference(image, pick=3)
    with pytest.raises(ValueError, match="pick must be"):
        analyzer.analyze_reference(image, pick="smallest")


def test_two_faces_of_similar_size_are_refused_unless_picked():
    faces = [box_face(0, 0, 100, 0.9), box_face(300, 0, 110, 0.95)]
    analyzer, image = ListAnalyzer(faces), colour_noise(500, 200)
    with pytest.raises(SeveralFacesError, match=r"two.jpg: found 2 faces, 2 of similar size.*face 1: 110x110 px at "
                                                r"\(300, 0\).*pass pick=<index>"):  # fmt: skip
        analyzer.analyze_reference(image, name="two.jpg")
    face, warnings = analyzer.analyze_reference(image, pick=0, name="two.jpg")
    assert face.bbox[0] == 0 and "found 2 faces" in warnings[0] and "using face 0, chosen by pick=0" in warnings[0]
    assert analyzer.analyze_reference(image, pick="best")[0].bbox[0] == 0, "faces in score order: 0 is listed first"
    clearly_larger = ListAnalyzer([box_face(0, 0, 100), box_face(300, 0, 130)])  # sizes 0.77 apart: not similar
    assert clearly_larger.analyze_reference(image)[0].bbox[0] == 300
    # a large detection the detector is barely sure of (dlib's score 0.07 on a badge beside a face at 1.63) is
    # neither 'largest' nor a rival, though it is listed in the warning
    weak_badge = ListAnalyzer([box_face(0, 0, 88, 1.63), box_face(300, 0, 105, 0.07)])
    face, warnings = weak_badge.analyze_reference(image, name="astronaut.jpg")
    assert face.bbox[0] == 0 and "found 2 faces" in warnings[0]


def test_reference_without_a_face_or_with_a_small_one_is_an_error():
    image = colour_noise(64, 48)
    with pytest.raises(NoFaceError, match=r"<RGB image 64x48>: no face found \(a fixed list\): if the face fills"):
        ListAnalyzer([]).analyze_reference(image)
    with pytest.raises(FaceTooSmallError, match="40x40 px, smaller than min_face_size=64"):
        ListAnalyzer([box_face(0, 0, 40)]).analyze_reference(image)
    face, warnings = ListAnalyzer([box_face(0, 0, 80)]).analyze_reference(image, with_embedding=False)
    expected = ("<RGB image 64x48>: the face is only 80 px; the list backend's models are built for faces of 112 px "
                "and up, so the result may lose likeness")  # fmt: skip
    assert face.embedding is None and warnings == [expected]
    assert ListAnalyzer([box_face(0, 0, 40)]).analyze_reference(image, min_face_size=32)[0].width == 40


def test_no_face_message_says_the_photo_is_nearly_black_or_flat(tmp_path):
    twelve_bit = np.random.default_rng(0).integers(0, 4096, (48, 64), dtype=np.uint16)  # a 12-bit sensor's values
    Image.fromarray(twelve_bit).save(tmp_path / "dark.png")  # a 16-bit grayscale PNG
    dark = load_image(tmp_path / "dark.png")
    with pytest.raises(NoFaceError, match=r"dark.png: no face found \(a fixed list\): the photo is nearly black "
                                          r"\(99 % of its pixels at or below 16/255\).*12-bit"):  # fmt: skip
        ListAnalyzer([]).analyze_reference(dark, name="dark.png")
    with pytest.raises(NoFaceError, match=r"nearly uniform \(luminance std 0.0/255\)"):
        ListAnalyzer([]).analyze_reference(Image.new("RGB", (64, 48), "white"))


def test_grayscale_dark_and_low_contrast_photos_are_warned_about():
    face = box_face(10, 10, 200)
    image = colour_noise(256, 256)
    assert ListAnalyzer([face]).analyze_reference(image, with_embedding=False)[1] == []
    gray = ImageOps.grayscale(image).convert("RGB")
    (warning,) = ListAnalyzer([face]).analyze_reference(gray, with_embedding=False, name="bw.jpg")[1]
    assert warning.startswith("bw.jpg: the photo is grayscale, so the colour cues of identity")
    dark = ImageEnhance.Brightness(image).enhance(0.15)
    (warning,) = ListAnalyzer([face]).analyze_reference(dark, with_embedding=False, name="dark.jpg")[1]
    assert warning.startswith("dark.jpg: the face is dark (mean luminance")
    flat = Image.fromarray(np.random.default_rng(1).integers(120, 130, (256, 256, 3), dtype=np.uint8))
    (warning,) = ListAnalyzer([face]).analyze_reference(flat, with_embedding=False, name="fog.jpg")[1]
    assert warning.startswith("fog.jpg: the face has low contrast (luminance std")


def test_arcface_embedding_uses_the_face_found_again_not_a_higher_scoring_neighbour():
    face = box_face(150, 150, 100)
    cx, cy, half = clip_square(face)
    origin = np.array([round(cx - 2 * half), round(cy - 2 * half)] * 2)
    x0, y0, x1, _ = face.bbox - origin  # the face in the ArcFace crop's pixels
    neighbour, again = box_face(0, 0, 60, score=0.99), box_face(x0 + 3, y0 - 2, x1 - x0, score=0.5)
    image = Image.new("RGB", (400, 400))
    assert arcface_embedding(ListAnalyzer([neighbour, again]), image, face).tolist() == [0, 1, 0, 0]
    with pytest.raises(NoFaceError, match=r"\[150, 150, 250, 250\] was not found again in its ArcFace crop"):
        arcface_embedding(ListAnalyzer([neighbour]), image, face)


def test_registry_names_the_backends():
    assert {"antelopev2", "dlib", "toy"} <= set(FACE_BACKENDS)
    assert all(issubclass(face_backend(name), FaceAnalyzer) for name in FACE_BACKENDS)
    with pytest.raises(ValueError, match="unknown face backend 'nope'; known: antelopev2, dlib, toy"):
        make_face_analyzer("nope")


# ---------------------------------------------------------------- antelopev2: missing files and retries


def test_missing_antelopev2_files_say_which_where_and_how(tmp_path):
    with pytest.raises(ModelFilesMissingError) as error:
        make_face_analyzer("antelopev2", root=tmp_path)
    message = str(error.value)
    folder = tmp_path / "models" / "antelopev2"
    assert f"not found in {folder}/" in message and ANTELOPEV2_URL in message
    assert all(file in message for file in ANTELOPEV2_FILES)
    assert isinstance(error.value, FileNotFoundError)

    folder.mkdir(parents=True)
    for file in ("scrfd_10g_bnkps.onnx", "2d106det.onnx"):
        (folder / file).write_bytes(b"")
    (folder / "antelopev2").mkdir()  # the zip unpacked one level too deep
    with pytest.raises(ModelFilesMissingError, match=r"missing: glintr100\.onnx not found.*move them up one level"):
        InsightFaceAnalyzer(root=tmp_path)


class FakeSCRFD:
    """Finds its two faces (lower score first) only at detection sizes <= works_at."""

    def __init__(self, works_at):
        self.works_at, self.tried = works_at, []

    def detect(self, image, input_size=None, max_num=0, metric="default"):
        self.tried.append(input_size)
        if input_size[0] > self.works_at:
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32)
        boxes = np.array([[10, 10, 90, 90, 0.6], [100, 10, 200, 110, 0.95]], np.float32)
        kpss = np.stack([box_face(*box[:2], box[2] - box[0]).kps for box in boxes])
        return boxes, kpss


class FakeLandmarks:
    def get(self, image, face):
        face.landmark_2d_106 = np.tile(face.bbox[:2], (106, 1))


class FakeArcFace:
    def get(self, image, face):
        face.embedding = np.concatenate([face.kps[0], np.ones(510)]).astype(np.float32)
        return face.embedding


def fake_antelopev2(works_at):
    models = {"detection": FakeSCRFD(works_at), "landmark_2d_106": FakeLandmarks(), "recognition": FakeArcFace()}
    return InsightFaceAnalyzer(models=models), models["detection"]


def test_antelopev2_retries_smaller_detection_sizes_like_the_release():
    analyzer, detector = fake_antelopev2(works_at=384)
    faces = analyzer.detect(Image.new("RGB", (300, 200)))
    assert detector.tried == [(640, 640), (512, 512), (384, 384)]
    assert [face.score for face in faces] == pytest.approx([0.95, 0.6]), "highest score first"
    assert faces[0].landmarks_106.shape == (106, 2) and faces[0].embedding.shape == (512,)
    assert np.linalg.norm(faces[0].embedding) == pytest.approx(1.0)
    assert np.allclose(analyzer.embed(Image.new("RGB", (300, 200)), faces[1]), faces[1].embedding)


def test_antelopev2_without_a_face_at_any_size_names_the_sizes():
    analyzer, detector = fake_antelopev2(works_at=0)
    with pytest.raises(NoFaceError, match=r"no face found \(SCRFD at detection sizes 640, 512, 384, 256\)"):
        analyzer.analyze_reference(Image.new("RGB", (300, 200)), name="closeup.png")
    assert [size for size, _ in detector.tried] == [640, 512, 384, 256]


# ---------------------------------------------------------------- dlib on real photos shipped in packages


def package_file(package, *parts):
    module = pytest.importorskip(package)
    path = Path(module.__file__).parent.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} is not installed")
    return path


@pytest.fixture(scope="module")
def dlib_analyzer():
    pytest.importorskip("dlib")
    return make_face_analyzer("dlib")


@pytest.fixture(scope="module")
def photos():
    return {
        "t1": load_image(package_file("insightface", "data", "images", "t1.jpg")),
        "astronaut": load_image(package_file("skimage", "data", "astronaut.png")),
        "grace_hopper": load_image(package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg")),
    }


def test_dlib_finds_every_face_of_the_photos(dlib_analyzer, photos):
    # HOG finds all 6 faces of t1 without upsampling; upsampling once adds a false face on the astronaut's suit.
    counts = {name: len(dlib_analyzer.detect(image)) for name, image in photos.items()}
    assert counts == {"t1": 6, "astronaut": 1, "grace_hopper": 1}
    with pytest.raises(SeveralFacesError, match="t1.jpg: found 6 faces"):  # a group photo: whose likeness?
        dlib_analyzer.analyze_reference(photos["t1"], name="t1.jpg")
    face, warnings = dlib_analyzer.analyze_reference(photos["t1"], pick=2, name="t1.jpg")
    assert "found 6 faces" in warnings[0] and face.embedding.shape == (128,)


def test_dlib_keypoints_are_in_insightface_order(dlib_analyzer, photos):
    for name, image in photos.items():
        for face in dlib_analyzer.detect(image):
            left_eye, right_eye, nose, left_mouth, right_mouth = face.kps
            assert left_eye[0] < nose[0] < right_eye[0], name
            assert left_mouth[0] < right_mouth[0], name
            assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1]), name
            x0, _, x1, _ = face.bbox
            assert (x0 <= face.kps[:, 0]).all() and (face.kps[:, 0] <= x1).all(), name


def augmentations(image, face):
    """The same person again: mirrored, cropped around the face, and shifted, rotated and brightened a little."""
    x0, y0, x1, y1 = face.bbox
    side = x1 - x0
    crop = image.crop((int(x0 - side), int(y0 - side), int(x1 + side), int(y1 + side)))
    jitter = ImageEnhance.Brightness(image.rotate(4, center=tuple(face.kps[2]), translate=(5, -3))).enhance(1.15)
    return {"flip": ImageOps.mirror(image), "crop": crop, "jitter": jitter}


@pytest.mark.parametrize("person", ["astronaut", "grace_hopper"])
def test_dlib_identity_survives_flip_crop_and_jitter_better_than_other_people(dlib_analyzer, photos, person):
    references = {name: dlib_analyzer.analyze_reference(image, pick="best")[0] for name, image in photos.items()}
    others = [dlib_analyzer.embed(photos["t1"], face) for face in dlib_analyzer.detect(photos["t1"])]
    others += [face.embedding for name, face in references.items() if name not in (person, "t1")]
    reference = references[person].embedding
    worst_other = max(cosine_similarity(reference, other) for other in others)
    for kind, image in augmentations(photos[person], references[person]).items():
        # pick="best": on the jittered astronaut HOG also finds a false face on the suit (score 0.2),
        # a pixel larger than the real one (score 0.96), so the default pick="largest" would take it.
        same, _ = dlib_analyzer.analyze_reference(image, pick="best")
        similarity = cosine_similarity(reference, same.embedding)
        assert similarity > 0.95, kind
        assert similarity > worst_other + 0.05, f"{kind}: {similarity:.3f} vs another person {worst_other:.3f}"


def test_arcface_embedding_keeps_to_its_face_in_a_group(dlib_analyzer, photos):
    faces = dlib_analyzer.detect(photos["t1"])
    direct = [dlib_analyzer.embed(photos["t1"], face) for face in faces]
    for index, face in enumerate(faces):
        from_crop = arcface_embedding(dlib_analyzer, photos["t1"], face)
        similarities = [cosine_similarity(from_crop, other) for other in direct]
        assert int(np.argmax(similarities)) == index and similarities[index] > 0.97


def test_dlib_id_condition_gives_the_clip_crop_and_the_same_identity(dlib_analyzer, photos):
    condition = id_condition(dlib_analyzer, photos["grace_hopper"], name="grace_hopper.jpg")
    assert condition.warnings == []
    assert abs(condition.clip_image.width - condition.clip_image.height) <= 1
    assert condition.clip_image.getpixel((0, 0)) == (127, 127, 127), "background removed"
    reference = dlib_analyzer.embed(photos["grace_hopper"], condition.face)
    assert condition.embedding.shape == (128,) and cosine_similarity(condition.embedding, reference) > 0.97


def test_dlib_errors_for_blank_and_tiny_faces(dlib_analyzer, photos):
    with pytest.raises(NoFaceError, match=r"blank\.png: no face found \(dlib HOG with 0, 1 upsampling"):
        dlib_analyzer.analyze_reference(Image.new("RGB", (200, 200), "white"), name="blank.png")
    tiny = photos["grace_hopper"].resize((128, 150))
    with pytest.raises(FaceTooSmallError, match="smaller than min_face_size=64"):
        dlib_analyzer.analyze_reference(tiny)


def test_missing_dlib_files_say_where(tmp_path):
    with pytest.raises(ModelFilesMissingError, match=rf"shape_predictor_5_face_landmarks\.dat.*{tmp_path}"):
        DlibAnalyzer(models_dir=tmp_path)
