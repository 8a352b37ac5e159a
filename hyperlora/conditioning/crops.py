"""Face geometry of the conditioning images: the outline polygon, its soft mask and the release's crops.

Where a face carries insightface's 106 landmarks these functions reproduce the official ComfyUI
release (bytedance/ComfyUI-HyperLoRA @ feb11be, nodes `HyperLoRAIDCond` and `HyperLoRABaseCond`)
operation for operation, including its PIL resampling filters and rounding: PIL's `crop` rounds a
float box to the nearest pixel while the release pastes back at `int()` (truncated) offsets, which
can shift the pasted face by one pixel; we keep that.

Backends without 106 landmarks (dlib, the toy detectors: 5 keypoints and a box) get an outline
from `OUTLINE_TEMPLATE`, a mean jaw-and-eyebrow contour placed on the face by a similarity
transform fitted to the 5 keypoints (see `face_outline`).

Every function takes a face record with `bbox` [4], `kps` [5, 2] and an optional `landmarks_106`
[106, 2] (hyperlora.conditioning.faces.Face) and never modifies the image it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:
    from hyperlora.conditioning.faces import Face

# The release's 43 outline indices into the 106 landmarks: contour, eyebrows, then across the brow.
OUTLINE_106: tuple[int, ...] = (
    1, *range(9, 17), *range(2, 9), 0,
    *range(24, 17, -1), *range(32, 24, -1), 17,
    101, 105, 104, 103, 102, 50, 51, 49, 48, 43,
)  # fmt: skip

# insightface's 5-point ArcFace template for 112x112 crops (face_align.arcface_dst):
# left eye, right eye, nose tip, left mouth corner, right mouth corner ("left" = smaller x).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

# Mean face outline for backends without 106 landmarks, in the ArcFace template's 112x112 frame:
# dlib's 68-point jaw (0..16) then eyebrows (26..17), i.e. the same contour-plus-brows loop as
# OUTLINE_106. Measured on the 8 faces of insightface's t1.jpg, scikit-image's astronaut and
# matplotlib's grace_hopper (and their mirror images), aligned by their 68-point eye centres,
# nose tip and mouth corners, averaged and made symmetric about x = 56; rounded to 0.1 px.
OUTLINE_TEMPLATE = np.array(
    [
        [15.2, 53.0], [15.7, 63.6], [16.9, 74.3], [19.4, 84.8], [23.8, 94.4], [30.1, 103.1],
        [37.6, 110.5], [45.9, 116.8], [56.0, 118.5], [66.1, 116.8], [74.4, 110.5], [81.9, 103.1],
        [88.2, 94.4], [92.6, 84.8], [95.1, 74.3], [96.3, 63.6], [96.8, 53.0],
        [87.7, 44.4], [82.5, 40.2], [75.8, 39.3], [69.0, 40.5], [62.6, 43.6],
        [49.4, 43.6], [43.0, 40.5], [36.2, 39.3], [29.5, 40.2], [24.3, 44.4],
    ],
    dtype=np.float64,
)  # fmt: skip

GRAY = (127, 127, 127)   # the release's '#7f7f7f' background behind a masked face
MASK_WORK_SIZE = 512     # masks and face blurs are computed at this square size, then resized back
MASK_BLUR_RADIUS = 15    # GaussianBlur radius of the outline mask at MASK_WORK_SIZE
FACE_BLUR_RADIUS = 45    # GaussianBlur radius that erases the face for the Base branch
ID_MASK_SCALE = 1.0      # outline scale for the ID branch's background removal
BASE_MASK_SCALE = 1.4    # outline scale for the Base branch's face blur
CROP_MARGIN = 0.8        # half-side of the mask crop, relative to the outline's larger extent
CLIP_MARGIN = 0.75       # half-side of the CLIP crop, relative to the landmarks' larger extent
CLIP_SHIFT_UP = 0.125    # the CLIP crop's centre moves up by this fraction of its half-side


def fit_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking src [N,2] to dst [N,2], as 2x3."""
    src_z = src[:, 0] + 1j * src[:, 1]  # points as complex numbers: a similarity is z -> a*z + b
    dst_z = dst[:, 0] + 1j * dst[:, 1]
    src_c, dst_c = src_z - src_z.mean(), dst_z - dst_z.mean()
    a = np.sum(dst_c * np.conj(src_c)) / np.sum(np.abs(src_c) ** 2)
    b = dst_z.mean() - a * src_z.mean()
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag]])


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to points [N,2]."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def face_outline(face: Face, *, mask_scale: float = 1.0) -> np.ndarray:
    """The face's outline polygon [P,2], scaled by mask_scale about its mean point.

    With 106 landmarks: the release's 43-point polygon. Otherwise: OUTLINE_TEMPLATE (27 points)
    mapped onto the face by the similarity that best takes ARCFACE_TEMPLATE to the face's 5
    keypoints. This approximation follows head roll and size but not the person's jaw shape.
    """
    if face.landmarks_106 is not None:
        points = np.asarray(face.landmarks_106, dtype=np.float64)[list(OUTLINE_106)]
    else:
        to_image = fit_similarity(ARCFACE_TEMPLATE, np.asarray(face.kps, dtype=np.float64))
        points = apply_affine(to_image, OUTLINE_TEMPLATE)
    center = points.mean(axis=0)
    return (points - center) * mask_scale + center


def landmark_box(face: Face) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) around all 106 landmarks, or around the template outline without them."""
    points = face.landmarks_106 if face.landmarks_106 is not None else face_outline(face)
    x0, y0 = np.min(points, axis=0)
    x1, y1 = np.max(points, axis=0)
    return float(x0), float(y0), float(x1), float(y1)


def clip_square(face: Face) -> tuple[float, float, float]:
    """(cx, cy, half_side) of the CLIP crop: 0.75 x the landmark extent, centre moved up by 1/8 of it."""
    x0, y0, x1, y1 = landmark_box(face)
    half = max(x1 - x0, y1 - y0) * CLIP_MARGIN
    return (x0 + x1) * 0.5, (y0 + y1) * 0.5 - half * CLIP_SHIFT_UP, half


def _square(cx: float, cy: float, half: float) -> tuple[float, float, float, float]:
    return cx - half, cy - half, cx + half, cy + half


def _outline_crop(image: Image.Image, face: Face, mask_scale: float):
    """The release's face_crop: a square around the outline, cut from the image and from the hard polygon mask.

    Returns (crop_image, crop_mask, paste_xy). The square is centred on the unscaled outline's
    mean with half-side 0.8 x its larger extent; paste_xy is where the release pastes it back.
    """
    points = face_outline(face)
    center = points.mean(axis=0)
    polygon = (points - center) * mask_scale + center
    mask = Image.new("L", image.size, 0)
    # A list of (x, y) tuples: PIL misreads float64 [N,2] arrays as polygons.
    ImageDraw.Draw(mask).polygon([tuple(p) for p in polygon.tolist()], fill=255)
    extent = points.max(axis=0) - points.min(axis=0)
    half = float(max(extent)) * CROP_MARGIN
    box = _square(float(center[0]), float(center[1]), half)
    paste_xy = (int(box[0]), int(box[1]))  # int() truncates, while crop() rounds: as in the release
    return image.crop(box), mask.crop(box), paste_xy


def _blur_at_work_size(image: Image.Image, radius: float) -> Image.Image:
    """Resize to 512x512 (bicubic), Gaussian-blur, resize back: blur strength relative to the crop size.

    A crop smaller than 128 px (the toy world's faces are ~40 px) is worked at 4x its size with the radius
    scaled alike: the same blur relative to the crop, without blurring 512x512 pixels that hold no more
    detail (that blur was two thirds of the toy world's conditioning time). Larger crops: exactly the release.
    """
    size = image.size
    side = min(MASK_WORK_SIZE, 4 * max(size))
    work = image.resize((side, side), Image.Resampling.BICUBIC)
    blurred = work.filter(ImageFilter.GaussianBlur(radius=radius * side / MASK_WORK_SIZE))
    return blurred.resize(size, Image.Resampling.BICUBIC)


def face_mask(image: Image.Image, face: Face, *, mask_scale: float = ID_MASK_SCALE) -> Image.Image:
    """The soft face mask (mode L, image size) with which mask_background pastes the face: 255 inside, 0 outside."""
    _, crop_mask, paste_xy = _outline_crop(image, face, mask_scale)
    mask = Image.new("L", image.size, 0)
    mask.paste(_blur_at_work_size(crop_mask, MASK_BLUR_RADIUS), paste_xy)
    return mask


def mask_background(
    image: Image.Image, face: Face, *, mask_scale: float = ID_MASK_SCALE, fill: tuple[int, int, int] = GRAY
) -> Image.Image:
    """Release §2.3 step 2: the face pasted through its soft outline mask onto a gray canvas of the image's size."""
    crop_image, crop_mask, paste_xy = _outline_crop(image, face, mask_scale)
    canvas = Image.new(image.mode, image.size, fill if image.mode == "RGB" else fill[0])
    canvas.paste(crop_image, paste_xy, _blur_at_work_size(crop_mask, MASK_BLUR_RADIUS))
    return canvas


def clip_crop(
    image: Image.Image, face: Face, *, remove_background: bool = True, grayscale: bool = False
) -> Image.Image:
    """Release §2.3 step 3: the square CLIP input (before the CLIP processor); out-of-image parts are black.

    The side is 1.5 x the landmarks' larger extent; grayscale gives a mode-L image.
    """
    source = mask_background(image, face) if remove_background else image
    crop = source.crop(_square(*clip_square(face)))
    return crop.convert("L") if grayscale else crop


def arcface_crop(image: Image.Image, face: Face) -> Image.Image:
    """Release §2.3 step 4: twice the CLIP square (3 x the landmark extent), cut from the unmasked image."""
    cx, cy, half = clip_square(face)
    return image.crop(_square(cx, cy, 2.0 * half))


def blur_face(image: Image.Image, face: Face, *, mask_scale: float = BASE_MASK_SCALE) -> Image.Image:
    """Release §2.4: a copy of the image whose face (outline x1.4) is Gaussian-blurred away."""
    crop_image, crop_mask, paste_xy = _outline_crop(image, face, mask_scale)
    blurred = _blur_at_work_size(crop_image, FACE_BLUR_RADIUS)
    result = image.copy()
    result.paste(blurred, paste_xy, _blur_at_work_size(crop_mask, MASK_BLUR_RADIUS))
    return result


def base_crop_box(
    face: Face,
    image_size: tuple[int, int],
    *,
    crop_scale_lrtb: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    safe_crop: bool = True,
) -> tuple[float, float, float, float]:
    """The Base branch's crop box: the CLIP square's half-side times (left, right, top, bottom) multipliers.

    With safe_crop the box is clamped to the image; without it PIL pads the outside with black.
    """
    if len(crop_scale_lrtb) != 4:
        raise ValueError(f"crop_scale_lrtb needs 4 multipliers (left, right, top, bottom), got {crop_scale_lrtb!r}")
    left, right, top, bottom = (float(s) for s in crop_scale_lrtb)
    cx, cy, half = clip_square(face)
    x0, y0, x1, y1 = cx - half * left, cy - half * top, cx + half * right, cy + half * bottom
    if safe_crop:
        width, height = image_size
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty Base crop {(x0, y0, x1, y1)} for an image of size {image_size}")
    return x0, y0, x1, y1


def base_image(
    image: Image.Image,
    face: Face,
    *,
    crop: bool = True,
    crop_scale_lrtb: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    safe_crop: bool = True,
) -> Image.Image:
    """Release §2.4: the Base branch's input, the face blurred out and (with crop) cut around the face."""
    blurred = blur_face(image, face)
    if not crop:
        return blurred
    return blurred.crop(base_crop_box(face, image.size, crop_scale_lrtb=crop_scale_lrtb, safe_crop=safe_crop))
