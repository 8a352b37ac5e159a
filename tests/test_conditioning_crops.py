"""The release's face geometry: outline polygon, soft mask, CLIP / ArcFace / Base crops, on synthetic faces."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hyperlora.conditioning.crops import (
    ARCFACE_TEMPLATE,
    GRAY,
    OUTLINE_106,
    OUTLINE_TEMPLATE,
    apply_affine,
    arcface_crop,
    base_crop_box,
    base_image,
    blur_face,
    clip_crop,
    clip_square,
    face_mask,
    face_outline,
    fit_similarity,
    landmark_box,
    mask_background,
)
from hyperlora.conditioning.faces import Face


def synthetic_face(cx=100.0, cy=110.0, rx=40.0, ry=50.0, landmarks=True, seed=0):
    """A face whose 43 outline landmarks lie on an ellipse (in polygon order) and the other 63 inside it."""
    rng = np.random.default_rng(seed)
    points = np.empty((106, 2))
    inner = [i for i in range(106) if i not in OUTLINE_106]
    angles = rng.uniform(0, 2 * np.pi, len(inner))
    radii = rng.uniform(0, 0.6, len(inner))
    points[inner] = np.stack([cx + rx * radii * np.cos(angles), cy + ry * radii * np.sin(angles)], 1)
    theta = np.linspace(0, 2 * np.pi, len(OUTLINE_106), endpoint=False)
    points[list(OUTLINE_106)] = np.stack([cx + rx * np.cos(theta), cy + ry * np.sin(theta)], 1)
    kps = [[cx - 0.4 * rx, cy - 0.2 * ry], [cx + 0.4 * rx, cy - 0.2 * ry], [cx, cy + 0.1 * ry],
           [cx - 0.3 * rx, cy + 0.45 * ry], [cx + 0.3 * rx, cy + 0.45 * ry]]  # fmt: skip
    return Face(
        bbox=[cx - rx, cy - ry, cx + rx, cy + ry], score=0.9, kps=kps, landmarks_106=points if landmarks else None
    )


def noise_image(size=(220, 240), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def coordinate_image(size=(220, 240)):
    """Pixel (x, y) holds (x, y, 200): crops show where they were cut from."""
    ys, xs = np.mgrid[: size[1], : size[0]]
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 200)], -1).astype(np.uint8))


def test_outline_indices_are_the_releases_43():
    expected = [1, 9, 10, 11, 12, 13, 14, 15, 16, 2, 3, 4, 5, 6, 7, 8, 0,
                24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17,
                101, 105, 104, 103, 102, 50, 51, 49, 48, 43]  # fmt: skip
    assert list(OUTLINE_106) == expected
    assert len(OUTLINE_106) == 43 == len(set(OUTLINE_106))


def test_outline_from_106_landmarks_scales_about_its_mean():
    face = synthetic_face()
    outline = face_outline(face)
    assert np.allclose(outline, face.landmarks_106[list(OUTLINE_106)], atol=1e-4)
    center = outline.mean(axis=0)
    assert np.allclose(face_outline(face, mask_scale=1.4), center + 1.4 * (outline - center), atol=1e-4)


def test_fit_similarity_recovers_a_similarity():
    angle, scale, shift = np.deg2rad(25), 2.5, np.array([30.0, -7.0])
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = ARCFACE_TEMPLATE @ rotation.T + shift
    matrix = fit_similarity(ARCFACE_TEMPLATE, moved)
    assert np.allclose(matrix, np.hstack([rotation, shift[:, None]]), atol=1e-9)


def test_template_outline_follows_the_keypoints_without_106_landmarks():
    canonical = Face(bbox=[0, 0, 112, 112], score=1.0, kps=ARCFACE_TEMPLATE)
    assert np.allclose(face_outline(canonical), OUTLINE_TEMPLATE, atol=1e-3)

    matrix = np.array([[0.0, -3.0, 400.0], [3.0, 0.0, 50.0]])  # rolled 90 degrees, 3x larger
    turned = Face(bbox=[0, 0, 1, 1], score=1.0, kps=apply_affine(matrix, ARCFACE_TEMPLATE))
    outline = face_outline(turned)
    assert outline.shape == (len(OUTLINE_TEMPLATE), 2)
    assert np.allclose(outline, apply_affine(matrix, OUTLINE_TEMPLATE), atol=1e-3)
    x0, y0, x1, y1 = landmark_box(turned)
    assert (x0, y0) == pytest.approx(outline.min(axis=0)) and (x1, y1) == pytest.approx(outline.max(axis=0))

    mask = Image.new("L", (600, 600))  # eyes, nose and mouth lie inside the outline
    ImageDraw.Draw(mask).polygon([tuple(p) for p in outline.tolist()], fill=255)
    assert all(mask.getpixel((round(x), round(y))) == 255 for x, y in turned.kps)


@pytest.mark.parametrize("landmarks", [True, False])
def test_soft_mask_is_one_inside_zero_outside_and_soft_between(landmarks):
    face = synthetic_face(landmarks=landmarks)
    mask = np.asarray(face_mask(noise_image(), face))
    assert mask.shape == (240, 220)
    cx, cy = face.kps[2]
    assert mask[int(cy), int(cx)] == 255, "the face centre is fully inside"
    assert mask[0, 0] == 0 and mask[-1, -1] == 0 and mask[5, 110] == 0, "far outside is fully out"
    assert ((mask > 0) & (mask < 255)).sum() > 200, "the edge is blurred, not hard"


def test_masked_face_keeps_the_face_on_gray_with_the_releases_paste_offset():
    image, face = noise_image(), synthetic_face(cx=100.3, cy=110.7)
    masked = np.asarray(mask_background(image, face)).astype(int)
    mask = np.asarray(face_mask(image, face))
    assert (masked[mask == 0] == GRAY).all(), "outside the mask is the release's gray"

    outline = face_outline(face)
    center, half = outline.mean(axis=0), 0.8 * max(np.ptp(outline, axis=0))
    # crop() rounds the box, paste() truncates its offset: the face may move by one pixel, as in the release.
    dx, dy = (round(c - half) - int(c - half) for c in center)
    original = np.asarray(image).astype(int)
    ys, xs = np.nonzero(mask == 255)
    assert (masked[ys, xs] == original[ys + dy, xs + dx]).all()


def test_clip_crop_is_the_shifted_square_around_the_landmarks():
    image, face = coordinate_image(), synthetic_face()
    x0, y0, x1, y1 = landmark_box(face)
    cx, cy, half = clip_square(face)
    assert half == pytest.approx(0.75 * max(x1 - x0, y1 - y0))
    assert (cx, cy) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2 - half / 8))

    crop = clip_crop(image, face, remove_background=False)
    assert abs(crop.width - 2 * half) <= 1 and abs(crop.height - 2 * half) <= 1
    assert crop.getpixel((0, 0))[:2] == (round(cx - half), round(cy - half))

    masked = clip_crop(image, face)
    assert masked.size == crop.size and masked.getpixel((0, 0)) == GRAY
    assert clip_crop(image, face, grayscale=True).mode == "L"


def test_arcface_crop_is_three_times_the_landmarks_from_the_unmasked_image():
    image, face = coordinate_image((400, 400)), synthetic_face(cx=200, cy=210)
    cx, cy, half = clip_square(face)
    crop = arcface_crop(image, face)
    assert abs(crop.width - 4 * half) <= 1
    x0, y0, x1, y1 = landmark_box(face)
    assert crop.width == pytest.approx(3 * max(x1 - x0, y1 - y0), abs=1)
    assert crop.getpixel((0, 0)) == (round(cx - 2 * half), round(cy - 2 * half), 200), "not masked"


def test_faces_at_the_border_are_padded_black():
    image, face = noise_image(), synthetic_face(cx=30, cy=25)
    crop = np.asarray(clip_crop(image, face))
    _, cy, half = clip_square(face)
    pad = round(half - cy)  # rows above the image
    assert pad > 5 and (crop[: pad - 1] == 0).all()
    assert (np.asarray(arcface_crop(image, face))[:10, :10] == 0).all()

    masked = mask_background(image, face)
    assert masked.size == image.size and masked.getpixel((219, 239)) == GRAY

    box = base_crop_box(face, image.size)
    assert box[0] == 0 and box[1] == 0, "safe_crop clamps to the image"
    assert base_image(image, face).size == (round(box[2]), round(box[3]))
    unsafe = np.asarray(base_image(image, face, safe_crop=False))
    assert unsafe.shape[0] == pytest.approx(2 * half, abs=1) and (unsafe[:5, :5] == 0).all()


def test_blur_face_changes_the_face_and_nothing_far_away():
    image, face = noise_image(), synthetic_face()
    blurred = np.asarray(blur_face(image, face)).astype(int)
    original = np.asarray(image).astype(int)
    cx, cy = (int(v) for v in face.kps[2])
    inside = np.abs(blurred - original)[cy - 10 : cy + 10, cx - 10 : cx + 10].mean()
    assert inside > 40, "noise inside the face is blurred away"
    assert (blurred[:, :15] == original[:, :15]).all() and (blurred[-10:] == original[-10:]).all()
    assert image.getpixel((cx, cy)) == tuple(original[cy, cx]), "the input image is not modified"


def test_base_crop_box_uses_left_right_top_bottom_multipliers():
    face = synthetic_face(cx=100, cy=110)
    cx, cy, half = clip_square(face)
    box = base_crop_box(face, (1000, 1000), crop_scale_lrtb=(2, 1, 0.5, 1.5), safe_crop=False)
    assert box == pytest.approx((cx - 2 * half, cy - 0.5 * half, cx + half, cy + 1.5 * half))
    assert base_image(noise_image((1000, 1000)), face, crop=False).size == (1000, 1000)
    with pytest.raises(ValueError, match="4 multipliers"):
        base_crop_box(face, (1000, 1000), crop_scale_lrtb=(1, 1))
