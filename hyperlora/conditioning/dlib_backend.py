"""dlib's face analysis: HOG frontal detector, 5-point landmarks and the 128-d face-recognition ResNet.

Its weights ship in the face_recognition_models package, so this backend works offline; sharing
nothing with insightface, it serves as an independent judge of identity. We open the package's
.dat files by path: importing it would import pkg_resources, which setuptools 81 removed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hyperlora.conditioning.crops import ARCFACE_TEMPLATE, apply_affine, fit_similarity
from hyperlora.conditioning.faces import Face, FaceAnalyzer, ModelFilesMissingError, l2_normalise

DLIB_MODEL_FILES = {
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}
# HOG's window is 80x80 px: upsampling once reaches ~40 px faces, below the default minimum face size.
UPSAMPLES = (0, 1)

# dlib's 5 points are: 0, 1 the outer and inner corners of the eye at larger x (the subject's left
# eye), 2, 3 those of the eye at smaller x, 4 the bottom of the nose. It has no nose tip and no mouth
# corners, so insightface's 5 keypoints are estimated: eye centres are the corner means, and the
# nose tip and mouth corners are ARCFACE_TEMPLATE's, placed by the similarity that fits these three
# points (eye centres, nose bottom) to their mean positions in the ArcFace 112x112 frame below.
# Measured with dlib's 68-point model on the faces listed at crops.OUTLINE_TEMPLATE (symmetrised);
# on those faces the estimated mouth corners lie 0.2 eye-distances from the 68-point ones on average.
DLIB5_IN_ARCFACE = np.array([[39.1, 53.3], [72.9, 53.3], [56.0, 81.3]])


def face_recognition_models_dir() -> Path:
    """The folder of .dat files inside the installed face_recognition_models package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesMissingError(
            "dlib face models missing: the face_recognition_models package is not installed "
            "(pip install face-recognition-models), or pass models_dir=<folder with the .dat files>"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def kps_from_dlib5(points: np.ndarray) -> np.ndarray:
    """insightface-order keypoints [5,2] from dlib's 5 points [5,2] (see DLIB5_IN_ARCFACE)."""
    points = np.asarray(points, dtype=np.float64)
    measured = np.stack([points[2:4].mean(axis=0), points[0:2].mean(axis=0), points[4]])
    to_image = fit_similarity(DLIB5_IN_ARCFACE, measured)
    return np.concatenate([measured[:2], apply_affine(to_image, ARCFACE_TEMPLATE[2:])])


class DlibAnalyzer(FaceAnalyzer):
    """dlib HOG + 5-point landmarks + ResNet: no 106 landmarks, 128-d embeddings."""

    name = "dlib"
    embedding_dim = 128

    def __init__(self, *, models_dir: str | Path | None = None, upsamples: Sequence[int] = UPSAMPLES) -> None:
        """models_dir: folder holding DLIB_MODEL_FILES; default: the face_recognition_models package's."""
        try:
            import dlib
        except ImportError as error:
            raise ModelFilesMissingError("the dlib backend needs dlib: pip install dlib-bin") from error
        if not upsamples:
            raise ValueError("upsamples must hold at least one upsampling count")
        self.upsamples = tuple(int(n) for n in upsamples)
        folder = Path(models_dir) if models_dir is not None else face_recognition_models_dir()
        missing = [file for file in DLIB_MODEL_FILES.values() if not (folder / file).is_file()]
        if missing:
            raise ModelFilesMissingError(
                f"dlib face models missing: {', '.join(missing)} not found in {folder}/; "
                "pip install face-recognition-models, or pass models_dir=<folder with the .dat files>"
            )
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(folder / DLIB_MODEL_FILES["landmarks"]))
        self._encoder = dlib.face_recognition_model_v1(str(folder / DLIB_MODEL_FILES["recognition"]))

    @property
    def search_description(self) -> str:
        return f"dlib HOG with {', '.join(map(str, self.upsamples))} upsampling(s)"

    def detect(self, image: Image.Image) -> list[Face]:
        """HOG detection at each upsampling count in turn until one finds a face; score order."""
        pixels = _to_rgb_array(image)
        for upsample in self.upsamples:
            rects, scores, _ = self._detector.run(pixels, upsample, 0.0)
            if len(rects):
                break
        faces = []
        for rect, score in zip(rects, scores, strict=True):
            points = self._points(pixels, rect)
            bbox = [rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1]  # dlib's right/bottom are inclusive
            faces.append(Face(bbox=bbox, score=score, kps=kps_from_dlib5(points)))
        return sorted(faces, key=lambda face: -face.score)

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        """dlib's ResNet on its own 150x150 chip, aligned by 5 points predicted again from face.bbox."""
        pixels = _to_rgb_array(image)
        shape = self._predictor(pixels, self._rect(face))
        return l2_normalise(np.array(self._encoder.compute_face_descriptor(pixels, shape)))

    def _rect(self, face: Face):
        x0, y0, x1, y1 = (round(float(v)) for v in face.bbox)
        return self._dlib.rectangle(x0, y0, x1 - 1, y1 - 1)

    def _points(self, pixels: np.ndarray, rect) -> np.ndarray:
        shape = self._predictor(pixels, rect)
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))
