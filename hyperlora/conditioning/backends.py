"""The face backends by name: the one place a new backend is registered.

Backends are imported when first asked for, so the conditioning layer does not import a world
(the toy backend lives with the toy world) or a heavy dependency it does not use.
"""

from __future__ import annotations

import importlib
from typing import Any

from hyperlora.conditioning.faces import FaceAnalyzer

FACE_BACKENDS: dict[str, str] = {
    "antelopev2": "hyperlora.conditioning.insightface_backend:InsightFaceAnalyzer",  # the release's analyser (weights by path)
    "dlib": "hyperlora.conditioning.dlib_backend:DlibAnalyzer",  # offline, the independent identity judge
    "toy": "hyperlora.toy.face_backend:ToyFaceAnalyzer",  # the toy world's ONNX detector + ArcFace (onnxruntime)
}


def face_backend(name: str) -> type[FaceAnalyzer]:
    """The analyser class registered under `name`."""
    if name not in FACE_BACKENDS:
        raise ValueError(f"unknown face backend {name!r}; known: {', '.join(sorted(FACE_BACKENDS))}")
    module, _, attribute = FACE_BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def make_face_analyzer(name: str, **kwargs: Any) -> FaceAnalyzer:
    """Build the backend registered under `name` with its keyword arguments (e.g. root= for antelopev2)."""
    return face_backend(name)(**kwargs)
