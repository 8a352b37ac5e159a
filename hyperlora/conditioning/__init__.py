"""Conditioning: reference photos -> what the hypernetwork consumes (face crops, masks, identity embeddings).

images.py loads any photo as upright 8-bit RGB; faces.py defines the Face record, the FaceAnalyzer
interface and the reference checks; quality.py says what a photo looks like (grayscale, dark, flat);
crops.py reproduces the release's masks and crops; backends.py names the face backends (antelopev2
via insightface, dlib, toy); references.py turns photos into the hypernetwork's inputs.
"""

from hyperlora.conditioning.backends import FACE_BACKENDS, make_face_analyzer
from hyperlora.conditioning.crops import (
    OUTLINE_106,
    arcface_crop,
    base_image,
    blur_face,
    clip_crop,
    clip_square,
    face_mask,
    face_outline,
    landmark_box,
    mask_background,
)
from hyperlora.conditioning.dlib_backend import DlibAnalyzer
from hyperlora.conditioning.faces import (
    Face,
    FaceAnalyzer,
    FaceTooSmallError,
    IDCondition,
    ModelFilesMissingError,
    NoFaceError,
    SeveralFacesError,
    arcface_embedding,
    cosine_similarity,
    id_condition,
)
from hyperlora.conditioning.images import ConditioningError, ImageInputError, load_image, to_rgb
from hyperlora.conditioning.insightface_backend import InsightFaceAnalyzer

__all__ = [
    "FACE_BACKENDS",
    "OUTLINE_106",
    "ConditioningError",
    "DlibAnalyzer",
    "Face",
    "FaceAnalyzer",
    "FaceTooSmallError",
    "IDCondition",
    "ImageInputError",
    "InsightFaceAnalyzer",
    "ModelFilesMissingError",
    "NoFaceError",
    "SeveralFacesError",
    "arcface_crop",
    "arcface_embedding",
    "base_image",
    "blur_face",
    "clip_crop",
    "clip_square",
    "cosine_similarity",
    "face_mask",
    "face_outline",
    "id_condition",
    "landmark_box",
    "load_image",
    "make_face_analyzer",
    "mask_background",
    "to_rgb",
]
