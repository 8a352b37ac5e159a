"""Face analysis: one face record (`Face`), one backend interface (`FaceAnalyzer`), and the reference checks.

A backend finds faces and embeds them; everything above it (which face to use and whether the choice
is safe, whether it is large enough, what to say about the photo, the release's ID-condition crops) is
written once here for every backend. Backends live in
insightface_backend.py (antelopev2, the release's analyser) and dlib_backend.py (an independent
judge of identity); backends.py maps their names to classes.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
from PIL import Image

from hyperlora.conditioning import crops
from hyperlora.conditioning.images import ConditioningError, describe
from hyperlora.conditioning.quality import photo_warnings, why_no_face

DEFAULT_MIN_FACE_SIZE = 64   # px, shorter bbox side; smaller faces are refused
SMALL_FACE_WARNING = 112     # px; below ArcFace's 112x112 input the identity is upsampled, so we warn
SIMILAR_SIZE = 0.8           # pick='largest' refuses when the runner-up's size (sqrt of area) is this close
NO_FACE_ADVICE = ("if the face fills the photo, pad it with a border (detectors miss extreme close-ups); if it shows "
                  "several people or a cut-off face, crop it to one whole face")  # fmt: skip

Pick = Literal["largest", "best"] | int


class NoFaceError(ConditioningError, ValueError):
    """No usable face in a reference image."""


class FaceTooSmallError(ConditioningError, ValueError):
    """The chosen face is smaller than the minimum size."""


class SeveralFacesError(ConditioningError, ValueError):
    """pick='largest' on a photo with two or more faces of similar size: which person is meant is a guess."""


class ModelFilesMissingError(ConditioningError, FileNotFoundError):
    """A backend's weight files are absent; the message says which, where we looked and how to get them."""


@dataclass(eq=False)  # compared by identity: == on numpy fields would be ambiguous
class Face:
    """One detected face, in pixel coordinates of the image it was found in.

    kps follow insightface: left eye, right eye, nose tip, left mouth corner, right mouth corner,
    where "left" is the smaller x in an upright face (the subject's right).
    """

    bbox: np.ndarray                          # [4] x0, y0, x1, y1
    score: float                              # detector confidence; the scale is the backend's own
    kps: np.ndarray                           # [5,2] eyes, nose tip, mouth corners (order above)
    landmarks_106: np.ndarray | None = None   # [106,2] insightface 2d106det; antelopev2 backend only
    embedding: np.ndarray | None = None       # [D] L2-normalised identity embedding, D set by the backend

    def __post_init__(self) -> None:
        self.bbox = _float_array(self.bbox, (4,), "bbox")
        self.kps = _float_array(self.kps, (5, 2), "kps")
        self.score = float(self.score)
        if self.landmarks_106 is not None:
            self.landmarks_106 = _float_array(self.landmarks_106, (106, 2), "landmarks_106")
        if self.embedding is not None:
            self.embedding = l2_normalise(np.asarray(self.embedding, dtype=np.float32).ravel())

    @property
    def width(self) -> float:
        return float(self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        return float(self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def with_embedding(self, embedding: np.ndarray) -> Face:
        return dataclasses.replace(self, embedding=embedding)


class FaceAnalyzer(abc.ABC):
    """A face backend: detect faces, embed one. Subclasses set `name` and `embedding_dim`."""

    name: ClassVar[str]
    embedding_dim: ClassVar[int]
    small_face: ClassVar[float] = SMALL_FACE_WARNING  # px; a reference face below this gets a warning

    @abc.abstractmethod
    def detect(self, image: Image.Image) -> list[Face]:
        """Faces in an RGB image, highest detector score first; [] when none.

        A backend with several detection settings tries them in order until one finds a face.
        """

    @abc.abstractmethod
    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """The L2-normalised identity embedding [embedding_dim] of `face` in `image`."""

    @property
    @abc.abstractmethod
    def search_description(self) -> str:
        """What detect tries, for error messages, e.g. 'SCRFD at detection sizes 640, 512, 384, 256'."""

    def explain_miss(self, image: Image.Image) -> list[str]:
        """What the backend saw where detect found no face (e.g. candidates it set aside), for the error; [] if nothing."""
        return []

    def analyze_reference(
        self,
        image: Image.Image,
        *,
        pick: Pick = "largest",
        min_face_size: float = DEFAULT_MIN_FACE_SIZE,
        with_embedding: bool = True,
        name: str | None = None,
    ) -> tuple[Face, list[str]]:
        """Detect, choose and check the face of a reference photo; returns it with human-readable warnings.

        pick: 'largest' (bbox area; the default), 'best' (highest detector score: the release's
        choice), or an index into detect()'s score-ordered list. Several faces give a warning that
        lists them and names the choice: a false detection can be the largest (dlib HOG finds one on
        the astronaut). Warnings also cover a small face and a grayscale, dark or low-contrast photo.
        Raises NoFaceError (no face, saying what was seen; or a pick index out of range),
        SeveralFacesError (pick='largest' between faces of similar size) or FaceTooSmallError.
        """
        name = name or describe(image)
        faces = self.detect(image)
        if not faces:
            photo = why_no_face(image)  # nearly black or flat: that is the reason, whatever the backend saw
            seen = "; ".join(photo + self.explain_miss(image) + ([] if photo else [NO_FACE_ADVICE]))
            raise NoFaceError(f"{name}: no face found ({self.search_description}): {seen}")
        face, warnings = choose_face(faces, pick, name, refuse_similar=True)
        side = min(face.width, face.height)
        if side < min_face_size:
            raise FaceTooSmallError(
                f"{name}: the face is {face.width:.0f}x{face.height:.0f} px, smaller than "
                f"min_face_size={min_face_size:g}; use a larger photo or a closer crop of the face"
            )
        if side < self.small_face:
            warnings.append(
                f"{name}: the face is only {side:.0f} px; the {self.name} backend's models are built for faces of "
                f"{self.small_face:g} px and up, so the result may lose likeness"
            )
        warnings += photo_warnings(image, face.bbox, name)
        if with_embedding and face.embedding is None:
            face = face.with_embedding(self.embed(image, face))
        return face, warnings


WEAK_SCORE_RATIO = 0.25  # 'largest' ignores detections scoring under this share of the surest one's score


def choose_face(faces: list[Face], pick: Pick, name: str, *, refuse_similar: bool = False) -> tuple[Face, list[str]]:
    """Pick one of several faces ('largest', 'best' or an index) and say so when there was a choice.

    refuse_similar: pick='largest' raises SeveralFacesError when another face is of similar size
    (SIMILAR_SIZE): a group photo or two people side by side, where taking either one would silently
    personalise the wrong person. Reference photos refuse; an evaluation judging generations does not.
    """
    if isinstance(pick, (int, np.integer)) and not isinstance(pick, bool):
        if not -len(faces) <= pick < len(faces):
            raise NoFaceError(f"{name}: pick={pick} but only {len(faces)} face(s) were found: {_listing(faces)}")
        index = int(pick) % len(faces)
    elif pick == "largest":
        # A detection far less sure than the surest is no candidate: dlib upsampled finds the astronaut's 105 px
        # mission patch at score 0.07 beside her 88 px face at 1.63, and 'largest' took the patch.
        best = max(f.score for f in faces)
        sure = [i for i, f in enumerate(faces) if best <= 0 or f.score >= WEAK_SCORE_RATIO * best]
        index = max(sure, key=lambda i: faces[i].area)
        rivals = [i for i in sure if i != index and faces[i].area >= SIMILAR_SIZE**2 * faces[index].area]
        if rivals and refuse_similar:
            raise SeveralFacesError(
                f"{name}: found {len(faces)} faces, {len(rivals) + 1} of similar size, so the largest is no safe "
                f"guess: {_listing(faces)}; pass pick=<index> to choose one (or 'best' for the detector's surest), "
                "or crop the photo to one face"
            )
    elif pick == "best":
        index = 0
    else:
        raise ValueError(f"pick must be 'largest', 'best' or an int index, got {pick!r}")
    warnings = []
    if len(faces) > 1:
        warnings.append(
            f"{name}: found {len(faces)} faces ({_listing(faces)}); using face {index}, chosen by pick={pick!r}; "
            "pass pick=<index> to use another"
        )
    return faces[index], warnings


def _listing(faces: list[Face]) -> str:
    """'face 0: 120x130 px at (40, 52), score 0.99; face 1: ...' (numbered by detector score, as pick=<index>)."""
    return "; ".join(f"face {i}: {f.width:.0f}x{f.height:.0f} px at ({f.bbox[0]:.0f}, {f.bbox[1]:.0f}), "
                     f"score {f.score:.2f}" for i, f in enumerate(faces))  # fmt: skip


@dataclass
class IDCondition:
    """What the ID branch consumes for one reference photo (release §2.3), before the CLIP processor."""

    clip_image: Image.Image   # square crop for CLIP: mode RGB, or L when grayscale
    embedding: np.ndarray     # [D] L2-normalised identity embedding of the ArcFace crop
    face: Face                # the chosen face, in the reference image's pixels
    warnings: list[str] = field(default_factory=list)


def id_condition(
    analyzer: FaceAnalyzer,
    image: Image.Image,
    *,
    pick: Pick = "largest",
    min_face_size: float = DEFAULT_MIN_FACE_SIZE,
    grayscale: bool = False,
    remove_background: bool = True,
    name: str | None = None,
) -> IDCondition:
    """Release §2.3 for one photo: choose the face, cut the (masked) CLIP crop, embed the ArcFace crop."""
    face, warnings = analyzer.analyze_reference(
        image, pick=pick, min_face_size=min_face_size, with_embedding=False, name=name
    )
    clip_image = crops.clip_crop(image, face, remove_background=remove_background, grayscale=grayscale)
    embedding = arcface_embedding(analyzer, image, face, name=name)
    return IDCondition(clip_image=clip_image, embedding=embedding, face=face, warnings=warnings)


def arcface_embedding(analyzer: FaceAnalyzer, image: Image.Image, face: Face, *, name: str | None = None) -> np.ndarray:
    """Release §2.3 step 4: detect again in the 3x crop of the unmasked image and embed the face found there.

    The release embeds the crop's highest-scoring face; we embed the one that overlaps `face` most,
    the same face unless the crop holds several people (where the release may embed a neighbour).
    """
    crop = crops.arcface_crop(image, face)
    found = analyzer.detect(crop)
    cx, cy, half = crops.clip_square(face)
    left, top = round(cx - 2 * half), round(cy - 2 * half)  # the crop's origin: PIL rounds crop boxes
    expected = face.bbox - np.array([left, top, left, top], dtype=np.float32)
    overlaps = [box_iou(f.bbox, expected) for f in found]
    if not found or max(overlaps) <= 0.0:
        raise NoFaceError(
            f"{name or describe(image)}: the face at {np.round(face.bbox).astype(int).tolist()} was not found "
            f"again in its ArcFace crop ({analyzer.search_description})"
        )
    chosen = found[int(np.argmax(overlaps))]
    return chosen.embedding if chosen.embedding is not None else analyzer.embed(crop, chosen)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings (normalised here, so raw vectors work too)."""
    return float(np.dot(l2_normalise(a), l2_normalise(b)))


def l2_normalise(vector: np.ndarray) -> np.ndarray:
    """vector / ||vector|| as float32; a zero or non-finite vector is an error, not a silent NaN."""
    vector = np.asarray(vector, dtype=np.float32).ravel()
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"cannot normalise an embedding with norm {norm}")
    return vector / norm


def _float_array(value, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.shape != shape:
        raise ValueError(f"Face.{what} must have shape {list(shape)}, got {list(array.shape)}")
    return array
