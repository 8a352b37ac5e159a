"""What a reference photo looks like, in words: grayscale, dark, flat. For warnings and 'no face found' messages.

A face backend reports boxes and scores; it cannot say that the photo it was given is nearly black
(a 12-bit image in a 16-bit file, read at 1/16 of its range) or grayscale (the identity's colours
are gone). These checks look at pixels only, so they hold for every backend. Thresholds are in
0-255 luminance units; the toy renders (the darkest and flattest faces we generate on purpose) sit
well clear of them: face-box std >= 10, face-box mean >= 52, 99th percentile of the image >= 85.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

NEARLY_BLACK = 40.0  # 99th percentile of the image's luminance below this: too dark to find a face in
NEARLY_FLAT = 4.0  # luminance std of the whole image below this: no detail to find a face in
DARK_FACE = 40.0  # mean luminance of the face box below this: likeness suffers
LOW_CONTRAST = 8.0  # luminance std of the face box below this
GRAY_TOLERANCE = 3.0  # channels within this of each other (99th percentile) make a photo grayscale

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's convert("L")


def luminance(image: Image.Image) -> np.ndarray:
    """[H, W] float32 luminance of an RGB image, 0-255."""
    return np.asarray(image.convert("RGB"), np.float32) @ _LUMA


def is_grayscale(image: Image.Image) -> bool:
    """All three channels (nearly) equal: a black-and-white photo stored as RGB (JPEG chroma noise allowed)."""
    rgb = np.asarray(image.convert("RGB"), np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return float(np.percentile(spread, 99)) <= GRAY_TOLERANCE


def why_no_face(image: Image.Image) -> list[str]:
    """What about the whole photo would hide a face from any detector (nearly black, nearly flat); [] if nothing."""
    luma = luminance(image)
    bright = float(np.percentile(luma, 99))
    if bright < NEARLY_BLACK:
        note = (f"the photo is nearly black (99 % of its pixels at or below {bright:.0f}/255); brighten it. A 10- "
                "or 12-bit image saved in a 16-bit file reads this dark (16-bit values are scaled by 1/257): scale it "
                "to the full 16-bit range first")  # fmt: skip
        return [note]
    if float(luma.std()) < NEARLY_FLAT:
        return [
            f"the photo is nearly uniform (luminance std {luma.std():.1f}/255): there is no detail to find a face in"
        ]
    return []


def photo_warnings(image: Image.Image, box: np.ndarray, name: str) -> list[str]:
    """Warnings about a usable photo's face region (box x0, y0, x1, y1): grayscale, dark, low contrast."""
    warnings = []
    if is_grayscale(image):
        warnings.append(f"{name}: the photo is grayscale, so the colour cues of identity (skin, hair and eye "
                        "colour) are lost and the generated person's colours are a guess; use a colour photo if "
                        "there is one")  # fmt: skip
    x0, y0, x1, y1 = np.round(box).astype(int)
    luma = luminance(image)[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]
    if luma.size == 0:
        return warnings
    if float(luma.mean()) < DARK_FACE:
        warnings.append(f"{name}: the face is dark (mean luminance {luma.mean():.0f}/255); identity encoders lose "
                        "detail in shadows, so the result may lose likeness: brighten the photo")  # fmt: skip
    elif float(luma.std()) < LOW_CONTRAST:
        warnings.append(f"{name}: the face has low contrast (luminance std {luma.std():.1f}/255: washed out, "
                        "foggy or heavily blurred); the result may lose likeness")  # fmt: skip
    return warnings
