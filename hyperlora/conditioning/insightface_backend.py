"""The release's face analyser: insightface's antelopev2 pack (SCRFD-10G, 2d106det, glintr100 ArcFace).

No package ships these weights; the user downloads the pack once (see `missing_pack_message`).
We load the three models we use by file name with insightface's model_zoo and run them ourselves
instead of through FaceAnalysis: that keeps the detection size per call explicit (the release sets
det_model.input_size, which insightface 2.x's multi-scale SCRFD ignores) and never triggers
FaceAnalysis's automatic download.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hyperlora.conditioning.faces import Face, FaceAnalyzer, ModelFilesMissingError, l2_normalise
from hyperlora.conditioning.images import ConditioningError

ANTELOPEV2_URL = "https://github.com/deepinsight/insightface/releases/download/v0.7/antelopev2.zip"
ANTELOPEV2_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")
# The models this backend runs, by insightface task name; the other two files of the pack are unused.
ANTELOPEV2_TASKS = {
    "detection": "scrfd_10g_bnkps.onnx",
    "landmark_2d_106": "2d106det.onnx",
    "recognition": "glintr100.onnx",
}
DET_SIZES = (640, 512, 384, 256)  # the release's FaceAttr node retries smaller sizes: close-ups fail at 640
DET_THRESH = 0.5                  # FaceAnalysis.prepare's default, used by the release


def antelopev2_dir(root: str | Path) -> Path:
    """Where the pack must be: <root>/models/antelopev2/, insightface's layout (ComfyUI: models/insightface)."""
    return Path(root).expanduser() / "models" / "antelopev2"


def check_antelopev2(root: str | Path) -> Path:
    """The pack's folder, or ModelFilesMissingError naming the missing files, the folder and how to get them."""
    folder = antelopev2_dir(root)
    missing = [file for file in ANTELOPEV2_TASKS.values() if not (folder / file).is_file()]
    if missing:
        raise ModelFilesMissingError(missing_pack_message(folder, missing))
    return folder


def missing_pack_message(folder: Path, missing: Sequence[str]) -> str:
    nested = folder / "antelopev2"
    hint = ""
    if nested.is_dir():  # unzipping inside the folder nests it: ComfyUI-HyperLoRA issues #6 and #56
        hint = f" The files seem to be in {nested}/: move them up one level."
    return (
        f"antelopev2 face models missing: {', '.join(missing)} not found in {folder}/.{hint} "
        f"Download {ANTELOPEV2_URL} (the pack holds {', '.join(ANTELOPEV2_FILES)}) and unzip it so that "
        f"{folder / ANTELOPEV2_TASKS['detection']} exists; pass the folder above 'models' as root."
    )


class InsightFaceAnalyzer(FaceAnalyzer):
    """antelopev2 through insightface: 106 landmarks and 512-d ArcFace (glintr100) embeddings."""

    name = "antelopev2"
    embedding_dim = 512

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        det_sizes: Sequence[int] = DET_SIZES,
        det_thresh: float = DET_THRESH,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        models: Mapping[str, Any] | None = None,
    ) -> None:
        """root: the insightface root holding models/antelopev2/ (ComfyUI: <ComfyUI>/models/insightface).

        models: already loaded insightface models by task name (detection, landmark_2d_106,
        recognition), e.g. test doubles; when given, root is not read.
        """
        if not det_sizes:
            raise ValueError("det_sizes must hold at least one detection size")
        self.det_sizes = tuple(int(size) for size in det_sizes)
        if models is None:
            if root is None:
                raise ValueError("InsightFaceAnalyzer needs root=<folder holding models/antelopev2/> or models=")
            models = _load_models(check_antelopev2(root), det_thresh, providers)
        missing = set(ANTELOPEV2_TASKS) - set(models)
        if missing:
            raise ValueError(f"models lacks the task(s) {sorted(missing)}")
        self.models = dict(models)

    @property
    def search_description(self) -> str:
        return f"SCRFD at detection sizes {', '.join(map(str, self.det_sizes))}"

    def detect(self, image: Image.Image) -> list[Face]:
        """The release's FaceAttr: each detection size in turn until one finds a face; score order."""
        bgr = _to_bgr(image)
        for size in self.det_sizes:
            faces = self._detect_at(bgr, size)
            if faces:
                return sorted(faces, key=lambda face: -face.score)
        return []

    def embed(self, image: Image.Image, face: Face) -> np.ndarray:
        from insightface.app.common import Face as InsightFace

        record = InsightFace(bbox=face.bbox, kps=face.kps, det_score=face.score)
        return l2_normalise(self.models["recognition"].get(_to_bgr(image), record))

    def _detect_at(self, bgr: np.ndarray, size: int) -> list[Face]:
        """FaceAnalysis.get at one detection size, limited to detection, 106 landmarks and recognition."""
        from insightface.app.common import Face as InsightFace

        boxes, kpss = self.models["detection"].detect(bgr, input_size=(size, size), max_num=0, metric="default")
        faces = []
        for box, kps in zip(boxes, kpss, strict=True):
            record = InsightFace(bbox=box[:4], kps=kps, det_score=box[4])
            self.models["landmark_2d_106"].get(bgr, record)  # sets record.landmark_2d_106
            self.models["recognition"].get(bgr, record)      # sets record.embedding
            faces.append(
                Face(
                    bbox=record.bbox,
                    score=record.det_score,
                    kps=record.kps,
                    landmarks_106=record.landmark_2d_106,
                    embedding=record.embedding,
                )
            )
        return faces


def _load_models(folder: Path, det_thresh: float, providers: Sequence[str]) -> dict[str, Any]:
    from insightface.model_zoo import get_model

    models = {}
    for task, file in ANTELOPEV2_TASKS.items():
        model = get_model(str(folder / file), providers=list(providers))
        if model is None or model.taskname != task:
            found = None if model is None else model.taskname
            raise ConditioningError(f"{folder / file}: expected an insightface {task} model, got {found}")
        if task == "detection":
            model.prepare(0, input_size=(DET_SIZES[0], DET_SIZES[0]), det_thresh=det_thresh)
        else:
            model.prepare(0)
        models[task] = model
    return models


def _to_bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
