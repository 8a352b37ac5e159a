"""The toy world's face backend for the conditioning layer: detector.onnx + recognizer.onnx, antelopev2's stand-in.

Both models run with onnxruntime; the recogniser is loaded through insightface's model zoo (an
ArcFaceONNX) and embeds crops aligned with insightface's `norm_crop`, exactly as antelopev2's
glintr100 would. The detector regresses one face per image; `detect` finds several by scanning
windows (face_scan.py), so a photo of two people is reported, not read as one made-up face.
The models are built by `hyperlora.toy.faces` (see there) into data/toy/faces/ by default.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from hyperlora.conditioning.faces import Face, FaceAnalyzer, ModelFilesMissingError, l2_normalise

from .face_scan import scan

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
    small_face = 16  # px: the toy world's 64 px renders hold faces of 20-35 px, the scale its models learned

    def __init__(
        self,
        *,
        model_dir: str | Path | None = None,
        det_threshold: float = 0.5,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        scan_windows: bool = True,
    ) -> None:
        """model_dir: folder holding detector.onnx and recognizer.onnx (default: the repository's data/toy/faces).

        scan_windows: find several faces (face_scan.py); False: the whole-image detection alone, as before the
        scan, for images known to hold one face (a 64 px render's conditioning then takes 20 ms instead of 42).
        """
        from .face_detector import FaceDetector
        from .face_recognizer import load_recognizer

        self.model_dir = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        detector_path = require_file(self.model_dir, DETECTOR_FILE)
        recognizer_path = require_file(self.model_dir, RECOGNIZER_FILE)
        self.det_threshold, self.scan_windows = float(det_threshold), scan_windows
        self.detector = FaceDetector(detector_path, threshold=self.det_threshold, providers=providers)
        self.recognizer = load_recognizer(recognizer_path, providers)
        self.embedding_dim = int(self.recognizer.output_shape[1])

    @property
    def search_description(self) -> str:
        where = "the image and on square windows of it, each" if self.scan_windows else "the image"
        return f"the toy ONNX detector on {where} resized to 64x64 px (score >= {self.det_threshold:g})"

    def detect(self, image: Image.Image) -> list[Face]:
        """The image's faces with their embeddings, highest score first; [] when none reaches the threshold."""
        rgb = np.asarray(image.convert("RGB"))
        found = (scan(self.detector, rgb, threshold=self.det_threshold).faces if self.scan_windows
                 else self.detector.detect(rgb))  # fmt: skip
        return [Face(bbox=d.box, score=d.score, kps=d.kps, embedding=self._embed(rgb, d.kps)) for d in found]

    def explain_miss(self, image: Image.Image) -> list[str]:
        """What the detector saw in a photo where it found no face: its best score, and regions it set aside."""
        seen = scan(self.detector, np.asarray(image.convert("RGB")), threshold=self.det_threshold)
        notes = [f"the detector's best face score on the whole image is {seen.whole.score:.2f}"]
        if seen.unconfirmed:
            boxes = ", ".join(_box(d.box) for d in seen.unconfirmed[:4])
            notes.append(f"{len(seen.unconfirmed)} face-like region(s) in windows did not hold up as faces when "
                         f"re-framed ({boxes})")  # fmt: skip
        return notes

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        return self._embed(np.asarray(image.convert("RGB")), face.kps)

    def _embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """norm_crop of the BGR image (insightface's convention: get_feat swaps it back to RGB), then the recogniser."""
        from insightface.utils.face_align import norm_crop

        with warnings.catch_warnings():  # scikit-image's deprecation of the `estimate` norm_crop calls, every call
            warnings.simplefilter("ignore", FutureWarning)
            crop = norm_crop(np.ascontiguousarray(rgb[:, :, ::-1]), np.asarray(kps, np.float32))
        return l2_normalise(self.recognizer.get_feat(crop)[0])


def _box(box: np.ndarray) -> str:
    """A box as 'WxH px at (x, y)' for messages."""
    return f"{box[2] - box[0]:.0f}x{box[3] - box[1]:.0f} px at ({box[0]:.0f}, {box[1]:.0f})"
