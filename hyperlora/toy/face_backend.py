"""The toy world's face backend for the conditioning layer: detector.onnx + recognizer.onnx, antelopev2's stand-in.

Both models run with onnxruntime; the recogniser is loaded through insightface's model zoo (an
ArcFaceONNX) and embeds crops aligned with insightface's `norm_crop`, exactly as antelopev2's
glintr100 would. The toy world has one face per image, so `detect` returns at most one face.
The models are built by `hyperlora.toy.faces` (see there) into data/toy/faces/ by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hyperlora.conditioning.faces import Face, FaceAnalyzer, ModelFilesMissingError, l2_normalise

DETECTOR_FILE = "detector.onnx"
RECOGNIZER_FILE = "recognizer.onnx"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "toy" / "faces"  # the repository's shipped models
BUILD_COMMAND = "python -m hyperlora.toy build"


def require_file(model_dir, name: str) -> Path:
    """model_dir / name, or ModelFilesMissingError naming the file, the folder and the command that builds it."""
    path = Path(model_dir) / name
    if not path.is_file():
        raise ModelFilesMissingError(
            f"toy face model {name} not found in {Path(model_dir).resolve()}/; build the toy models with "
            f"`{BUILD_COMMAND}` (or pass model_dir=<folder holding {DETECTOR_FILE} and {RECOGNIZER_FILE}>)"
        )
    return path


class ToyFaceAnalyzer(FaceAnalyzer):
    """The toy detector (box, 5 keypoints, score) and the toy ArcFace recogniser (128-d by default)."""

    name = "toy"
    embedding_dim = 128  # RecognizerTrainConfig's default; an instance takes its model's own size

    def __init__(
        self,
        *,
        model_dir: str | Path | None = None,
        det_threshold: float = 0.5,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        """model_dir: folder holding detector.onnx and recognizer.onnx (default: the repository's data/toy/faces)."""
        from .face_detector import FaceDetector
        from .face_recognizer import load_recognizer

        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        detector_path = require_file(self.model_dir, DETECTOR_FILE)
        recognizer_path = require_file(self.model_dir, RECOGNIZER_FILE)
        self.det_threshold = float(det_threshold)
        self.detector = FaceDetector(detector_path, threshold=self.det_threshold, providers=providers)
        self.recognizer = load_recognizer(recognizer_path, providers)
        self.embedding_dim = int(self.recognizer.output_shape[1])

    @property
    def search_description(self) -> str:
        return f"the toy ONNX detector on the image resized to 64x64 px (one face, score >= {self.det_threshold:g})"

    def detect(self, image: Image.Image) -> list[Face]:
        """The image's face with its embedding, or [] when the score is below the threshold."""
        rgb = np.asarray(image.convert("RGB"))
        return [Face(bbox=d.box, score=d.score, kps=d.kps, embedding=self._embed(rgb, d.kps))
                for d in self.detector.detect(rgb)]  # fmt: skip

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        return self._embed(np.asarray(image.convert("RGB")), face.kps)

    def _embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """norm_crop of the BGR image (insightface's convention: get_feat swaps it back to RGB), then the recogniser."""
        from insightface.utils.face_align import norm_crop

        crop = norm_crop(np.ascontiguousarray(rgb[:, :, ::-1]), np.asarray(kps, np.float32))
        return l2_normalise(self.recognizer.get_feat(crop)[0])
