"""Several faces from the toy detector, which regresses one box per image: scan windows, re-frame, keep what holds.

The detector (face_detector.py) was trained on one face per image, the face box 0.28-0.94 of its
input. Shown two faces it misses them (score ~0.01 for two renders side by side) or, when they sit
in a square canvas, regresses one box between them with a high score (~0.8-0.99): a made-up face.
So `scan` also runs it on square windows (the image's short side and half of it, overlapping by
half) and keeps a window's face only if it holds up when re-framed the way the detector learned
faces (box 45, 60 and 75 % of the window): score >= `confirm` and IoU >= 0.5 with the window's box
each time. Parts of one face (a chin or a hairline found in a half window) merge into the face
around them, and the whole-image box is dropped when it holds two faces, or cuts into a confirmed
face and does not hold up re-framed itself.

A single-face image gives exactly the whole-image detection, as before. Measured with the shipped
detector: 800 single-face val renders at 64-512 px (half degraded) all gave their one face; 48 toy
base-model generations gave the same detections as the detector alone; of 540 two-ups (side by
side, in a square canvas, stacked; 64-256 px renders) one stacked pair missed a face.
tests/test_toy_faces.py keeps a smaller version of each check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import cv2
import numpy as np

if TYPE_CHECKING:  # the detector module imports torch; scanning needs only its outputs
    from .face_detector import Detection, FaceDetector

WINDOW_SCALES = (1.0, 0.5)  # window sides, fractions of the image's short side; each slides by half its side
REFRAME = (0.45, 0.6, 0.75)  # face box side / window side when re-checking a candidate: the renders frame ~0.45
CONFIRM = 0.9  # score every re-framing must reach
SAME_FACE_IOU = 0.5  # IoU at which two boxes are the same face
PART_OVERLAP = 0.2  # share of the smaller box inside a larger one that makes it a part of that face
SPAN_AREA = 0.6  # a box that overlaps two faces (PART_OVERLAP) each at most this fraction of its area spans them


class Scan(NamedTuple):
    """What a scan saw: the faces it keeps, and what it set aside (for a 'no face found' message)."""

    faces: list[Detection]  # highest score first
    whole: Detection  # the detector on the whole image, whatever its score
    spanning: bool  # the whole-image box was dropped: it holds two faces, or cuts into one and fails re-framing
    unconfirmed: list[Detection]  # window candidates that did not hold up when re-framed


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two x0, y0, x1, y1 boxes over the smaller one's area."""
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    return float(width * height / max(min(_area(a), _area(b)), 1e-6))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes."""
    width, height = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return float(inter / (_area(a) + _area(b) - inter))


def windows(height: int, width: int, scales=WINDOW_SCALES) -> list[tuple[float, float, float]]:
    """Square windows (x, y, side) covering the image at each scale, overlapping by half a side."""
    out = []
    for scale in scales:
        side = max(1, round(min(height, width) * scale))
        step = max(1, side // 2)
        xs = sorted({*range(0, width - side + 1, step), width - side})
        ys = sorted({*range(0, height - side + 1, step), height - side})
        out += [(float(x), float(y), float(side)) for y in ys for x in xs]
    return out


def square_crop(image: np.ndarray, x: float, y: float, side: float) -> np.ndarray:
    """The side x side square at (x, y), edge pixels repeated where it leaves the image (as in training)."""
    x0, y0, side = round(x), round(y), max(1, round(side))
    h, w = image.shape[:2]
    pad = max(0, -x0, -y0, x0 + side - w, y0 + side - h)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    return image[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]


def scan(detector: FaceDetector, image: np.ndarray, *, threshold: float, confirm: float = CONFIRM) -> Scan:
    """Every face of an RGB uint8 image the detector finds whole or in a window and confirms when re-framed."""
    whole = detector.detect_batch([image])[0]
    boxes = windows(*image.shape[:2])
    found = detector.detect_batch([square_crop(image, *box) for box in boxes])
    candidates = [_moved(d, x, y) for d, (x, y, _) in zip(found, boxes) if d.score >= threshold]
    heads = _distinct(sorted(candidates, key=lambda d: -d.score))
    if whole.score >= threshold:  # the whole image's face needs no re-check; parts of it are merged below
        heads = [d for d in heads if iou(d.box, whole.box) < SAME_FACE_IOU]
    confirmed, unconfirmed = _reframe(detector, image, heads, max(confirm, threshold))
    faces = _merge_parts(confirmed)
    keep_whole = whole.score >= threshold
    if keep_whole and any(overlap(d.box, whole.box) > PART_OVERLAP for d in faces):
        # a window's face cuts into the whole-image box: keep that box if it holds no two faces and holds up re-framed
        keep_whole = not _spans(whole, faces) and bool(_reframe(detector, image, [whole], max(confirm, threshold))[0])
    if keep_whole:  # as before this scan: the whole-image face, and the window faces clear of it
        faces = [whole] + [d for d in faces if overlap(d.box, whole.box) <= PART_OVERLAP]
    spanning = whole.score >= threshold and not keep_whole
    return Scan(sorted(faces, key=lambda d: -d.score), whole, spanning, unconfirmed)


def _reframe(detector, image, heads: list[Detection], confirm: float) -> tuple[list[Detection], list[Detection]]:
    """Split candidates into those found again at every framing in REFRAME (returned as re-detected) and the rest."""
    if not heads:
        return [], []
    frames = []
    for d in heads:
        centre, side = (d.box[:2] + d.box[2:]) / 2, float(max(d.box[2:] - d.box[:2]))
        frames += [(centre[0] - side / f / 2, centre[1] - side / f / 2, side / f) for f in REFRAME]
    again = detector.detect_batch([square_crop(image, *frame) for frame in frames])
    confirmed, unconfirmed = [], []
    for i, d in enumerate(heads):
        checks = [_moved(again[i * len(REFRAME) + k], *frames[i * len(REFRAME) + k][:2]) for k in range(len(REFRAME))]
        if all(c.score >= confirm and iou(c.box, d.box) >= SAME_FACE_IOU for c in checks):
            face = checks[len(REFRAME) // 2]  # the renders' framing
            confirmed.append(face._replace(score=min(c.score for c in checks)))
        else:
            unconfirmed.append(d)
    return confirmed, unconfirmed


def _distinct(detections: list[Detection]) -> list[Detection]:
    """One detection per face: drop those that are the same face (IoU) as an earlier, higher-scoring one."""
    kept: list[Detection] = []
    for d in detections:
        if all(iou(d.box, k.box) < SAME_FACE_IOU for k in kept):
            kept.append(d)
    return kept


def _merge_parts(faces: list[Detection]) -> list[Detection]:
    """Surest first, drop a box that overlaps a kept one: a chin or a hairline is part of the face around it.

    The surest face is the one with the highest score at its worst framing; a box straddling a chin and
    the next person's forehead scores a little lower there (0.96-0.99) than a face (0.999 and up).
    """
    kept: list[Detection] = []
    for d in sorted(faces, key=lambda d: -d.score):
        if _spans(d, faces) or any(overlap(d.box, k.box) > PART_OVERLAP for k in kept):
            continue
        kept.append(d)
    return kept


def _spans(box: Detection, faces: list[Detection]) -> bool:
    """Does `box` hold two or more of `faces`, each much smaller than it (one box drawn around several faces)?"""
    held = [f for f in faces if f is not box and overlap(f.box, box.box) > PART_OVERLAP
            and _area(f.box) <= SPAN_AREA * _area(box.box)]  # fmt: skip
    return len(held) >= 2


def _area(box: np.ndarray) -> float:
    return float(max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0))


def _moved(d: Detection, x: float, y: float) -> Detection:
    """A detection in a window at (x, y), in the image's pixels (pixel centres at integers, as the renderer)."""
    offset = np.array([round(x), round(y)], np.float32)
    return d._replace(box=d.box + np.tile(offset, 2), kps=d.kps + offset)
