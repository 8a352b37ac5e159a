"""The face backends by name: the one place a new backend is registered."""

from __future__ import annotations

from typing import Any

from hyperlora.conditioning.dlib_backend import DlibAnalyzer
from hyperlora.conditioning.faces import FaceAnalyzer
from hyperlora.conditioning.insightface_backend import InsightFaceAnalyzer

FACE_BACKENDS: dict[str, type[FaceAnalyzer]] = {
    InsightFaceAnalyzer.name: InsightFaceAnalyzer,  # "antelopev2": the release's analyser (weights by path)
    DlibAnalyzer.name: DlibAnalyzer,                # "dlib": offline, the independent identity judge
    # "toy": the toy world's ONNX detector + recogniser (onnxruntime, norm_crop alignment) goes here.
}


def make_face_analyzer(name: str, **kwargs: Any) -> FaceAnalyzer:
    """Build the backend registered under `name` with its keyword arguments (e.g. root= for antelopev2)."""
    if name not in FACE_BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; known: {', '.join(sorted(FACE_BACKENDS))}")
    return FACE_BACKENDS[name](**kwargs)
