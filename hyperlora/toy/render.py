"""The toy world's portrait renderer: (identity, look) -> image, caption, face box, keypoints, mask.

Images are RGB uint8 numpy arrays of shape (size, size, 3), drawn with PIL at twice the size and
reduced 2x (box filter) for anti-aliasing. Coordinates follow OpenCV / insightface: the centre of
pixel (row i, column j) is (x=j, y=i). Faces live in "face units": the head spans y in about
[-1, 1] with y growing downwards, x = 0 is the midline and the eyes sit near y = 0. A face point
gets a depth z on the head's surface, so yaw moves features sideways (the nose tip most) and
squashes the far side, while roll rotates everything about the head centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from .identity import (  # noqa: F401 - re-exported: the toy world's public API lives here
    BROW_COLOURS, GLASSES_COLOURS, HAIR_COLOURS, IRIS_COLOURS, LOOK_ATTRIBUTES, LOOK_PRIORS, LOOK_RANGES, PALETTE,
    SPLITS, IdentityParams, Look, caption, identity_params, is_held_out, sample_look, split_identities,
    visible_attributes,
)

SUPERSAMPLE = 2  # draw at this multiple of the output size, then box-filter down
HEAD_SCALE = 0.29  # pixels per face unit as a fraction of the image size: face box ~0.35-0.55 W
HEAD_CENTRE = (0.5, 0.42)  # head centre (face-unit origin) as fractions of the image
FOREHEAD_CUT = -0.6  # top of the face box and mask in face units: detectors box forehead to chin
MIN_SIZE = 32


class Expression(NamedTuple):
    """How an expression moves the face, in face units (or factors of the identity's value)."""

    mouth_lift: float  # corners above the mouth centre (negative: a frown)
    mouth_open: float  # gap between the lips
    mouth_width: float  # factor on the identity's mouth width
    eye_open: float  # factor on the identity's eye opening
    brow_lift: float
    brow_frown: float  # added to the brows' angle (inner ends down)


EXPRESSIONS = {
    "neutral": Expression(0.0, 0.0, 1.0, 1.0, 0.0, 0.0),
    "smiling": Expression(0.08, 0.0, 1.12, 0.75, 0.0, 0.0),
    "open mouth": Expression(0.05, 0.14, 1.05, 0.9, 0.02, 0.0),
    "frowning": Expression(-0.06, 0.0, 0.95, 0.85, -0.03, 0.2),
    "surprised": Expression(0.0, 0.18, 0.55, 1.3, 0.09, -0.12),
}


@dataclass
class Render:
    """One rendered portrait (a uint8 RGB numpy array) and its exact ground truth."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    caption: str
    box: tuple[float, float, float, float]  # face box x1, y1, x2, y2 in pixels, forehead to chin
    keypoints: np.ndarray  # (5, 2) float32 x, y: left eye, right eye, nose tip, left/right mouth corner
    mask: np.ndarray  # (size, size) bool face polygon, forehead to chin; hair or glasses over it stay inside
    identity: int
    look: Look

    @property
    def attributes(self) -> dict[str, str]:
        """The visible categorical look attributes."""
        return visible_attributes(self.look)


# ---------------------------------------------------------------------------------------------
# Geometry


def _half_width(p: IdentityParams, y: np.ndarray) -> np.ndarray:
    """Half-width of the head outline at height y: a superellipse narrowed towards the chin."""
    u = np.clip(np.where(y < 0, -y / p.forehead, y / p.chin), 0.0, 1.0)
    base = (1.0 - u**p.squareness) ** (1.0 / p.squareness)
    return p.face_width * base * (1.0 - p.jaw_taper * np.where(y > 0, u, 0.0) ** 2)


def _outline(p: IdentityParams, y_top: float, n: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """Closed head outline from y_top to the chin: right side downwards, then left side upwards."""
    y = y_top + (p.chin - y_top) * (1 - np.cos(np.linspace(0, np.pi, n))) / 2
    x = _half_width(p, y)
    return np.concatenate([x, -x[::-1]]), np.concatenate([y, y[::-1]])


class _Pose:
    """Maps face units (x, y, z) to output pixels: yaw, then roll, then scale and shift."""

    def __init__(self, p: IdentityParams, look: Look, size: int):
        self.p, self.s = p, HEAD_SCALE * size * look.scale
        self.cx, self.cy = size * (HEAD_CENTRE[0] + look.shift_x), size * (HEAD_CENTRE[1] + look.shift_y)
        self.cos_yaw, self.sin_yaw = np.cos(look.yaw), np.sin(look.yaw)
        self.cos_roll, self.sin_roll = np.cos(look.roll), np.sin(look.roll)

    def __call__(self, x, y, z=None, lift: float = 0.0) -> np.ndarray:
        """(n, 2) pixel coordinates; z defaults to the head surface raised by `lift`."""
        x, y = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float))
        if z is None:
            w = np.maximum(_half_width(self.p, y), 1e-6)
            z = w * np.sqrt(np.clip(1 - (x / w) ** 2, 0, 1)) + lift
        else:
            z = np.asarray(z, float)
        xr = x * self.cos_yaw + z * self.sin_yaw
        px, py = xr * self.cos_roll - y * self.sin_roll, xr * self.sin_roll + y * self.cos_roll
        return np.stack([self.cx + self.s * px, self.cy + self.s * py], -1).reshape(-1, 2)


def _ellipse(cx, cy, rx, ry, angle=0.0, n=12):
    """Points of an ellipse in face units, rotated by `angle`."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ex, ey = rx * np.cos(t), ry * np.sin(t)
    return cx + ex * np.cos(angle) - ey * np.sin(angle), cy + ex * np.sin(angle) + ey * np.cos(angle)


def _shade(rgb, k: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * k)) for c in rgb)


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(int(x * (1 - t) + y * t) for x, y in zip(a, b))


def _tone(rgb, k: float) -> tuple[int, int, int]:
    """A second tone of a colour for trims and shadows: darker, or lighter for near-black colours."""
    return _shade(rgb, k) if sum(rgb) > 150 else _mix(rgb, (255, 255, 255), 1 - k)


class _Canvas:
    """A PIL drawing at SUPERSAMPLE x the output size that takes output-pixel coordinates."""

    def __init__(self, background: np.ndarray):
        self.image = Image.fromarray(background)
        self.draw = ImageDraw.Draw(self.image)

    @staticmethod
    def _xy(pts: np.ndarray) -> list[float]:
        return (pts * SUPERSAMPLE + (SUPERSAMPLE - 1) / 2).ravel().tolist()

    def poly(self, pts, fill):
        self.draw.polygon(self._xy(pts), fill=fill)

    def line(self, pts, fill, width: float):
        self.draw.line(self._xy(pts), fill=fill, width=max(1, round(width * SUPERSAMPLE)), joint="curve")

    def dot(self, centre, r: float, fill):
        (x, y), r = self._xy(np.asarray(centre)), r * SUPERSAMPLE
        self.draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)


# ---------------------------------------------------------------------------------------------
# Drawing, back to front


@lru_cache(maxsize=8)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an n x n canvas in units of the image size."""
    v = (np.arange(n, dtype=np.float32) + 0.5) / n
    return v[None, :], v[:, None]


def _background(look: Look, n: int) -> np.ndarray:
    """(n, n, 3) uint8 wall: plain, striped, dotted, gradient or checkered."""
    rng = np.random.default_rng(look.detail_seed)
    base = np.array(PALETTE[look.background_colour], np.float32)
    other = base * 0.72 if base.mean() > 140 else base * 0.55 + 110
    x, y = _grid(n)
    period, phase = rng.uniform(0.09, 0.16), rng.uniform(0, 1, 2)
    pattern = look.background_pattern
    if pattern == "plain":
        return np.broadcast_to(base.astype(np.uint8), (n, n, 3)).copy()
    if pattern == "gradient":
        t = np.broadcast_to(y if rng.random() < 0.5 else (x + y) / 2, (n, n))
        return (base + (other - base) * t[..., None] * rng.uniform(0.7, 1.0)).astype(np.uint8)
    if pattern == "striped":
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4])
        on = ((x * np.cos(angle) + y * np.sin(angle)) / period + phase[0]) % 1 < 0.5
    elif pattern == "dotted":
        dx, dy = (x / period + phase[0]) % 1 - 0.5, (y / period + phase[1]) % 1 - 0.5
        on = dx**2 + dy**2 < rng.uniform(0.2, 0.3) ** 2
    else:  # checkered
        on = (np.floor(x / period + phase[0]) + np.floor(y / period + phase[1])) % 2 == 1
    return np.where(on[..., None], other, base).astype(np.uint8)


# Neckline per clothing type: shape ("u" or "v") and depth below the shoulder line, in face units.
NECKLINES = {"t-shirt": ("u", 0.28), "hoodie": ("u", 0.2), "suit": ("u", 0.1), "sweater": ("v", 0.6),
             "turtleneck": ("u", 0.1)}


def _draw_body(c: _Canvas, look: Look, pose: _Pose, p: IdentityParams):
    """Shoulders in clothing, the hood or the shirt and tie, the neck and the neckline."""
    s, origin = pose.s, np.array([pose.cx, pose.cy + 1.22 * pose.s])  # the shoulder line, below the chin

    def at(points):  # body units (face units, not rotated with the head) -> pixels
        return np.asarray(points, float) * s + origin

    cloth = PALETTE[look.clothing_colour]
    trim = _tone(cloth, 0.7)
    side = np.array([[0.34, 0.0], [0.9, 0.1], [1.35, 0.28], [1.62, 0.6], [1.78, 1.3], [1.8, 3.0]])
    c.poly(at(np.concatenate([side, side[::-1] * [-1, 1]])), cloth)
    kind = look.clothing_type
    if kind == "hoodie":  # the hood lies folded around the neck
        c.poly(at(np.stack(_ellipse(0, 0.02, 0.8, 0.34, n=16), -1)), trim)
    elif kind == "suit":  # the shirt and the lapels
        c.poly(at([[-0.45, -0.02], [0.45, -0.02], [0.0, 1.05]]), (240, 240, 240))
        for sign in (-1, 1):
            c.line(at([[0.45 * sign, -0.02], [0.0, 1.05]]), trim, 0.05 * s)
    shape, depth = NECKLINES[kind]
    t = np.linspace(0, np.pi, 7)
    cut = at(np.stack([0.36 * np.cos(t), depth * (np.sin(t) if shape == "u" else 1 - np.abs(np.cos(t)))], -1))
    c.poly(np.concatenate([pose([-0.3, 0.3], [0.55, 0.55], z=0.0), cut]), _shade(p.skin_rgb, 0.86))
    if kind in ("t-shirt", "hoodie", "sweater"):
        c.line(cut, trim, 0.07 * s)
    if kind == "hoodie":  # drawstrings
        for sign in (-1, 1):
            c.line(at([[0.17 * sign, 0.18], [0.2 * sign, 0.8]]), (235, 235, 235), 0.04 * s)
    elif kind == "suit":
        tie = (30, 40, 90) if look.clothing_colour in ("red", "pink", "orange") else (150, 30, 40)
        c.poly(at([[-0.07, 0.06], [0.07, 0.06], [0.11, 0.9], [0.0, 1.02], [-0.11, 0.9]]), tie)
    elif kind == "turtleneck":
        c.poly(np.concatenate([pose([-0.33, 0.33], [0.7, 0.7], z=0.0), at([[0.4, 0.15], [-0.4, 0.15]])]), trim)


def _draw_hair_back(c: _Canvas, look: Look, pose: _Pose, p: IdentityParams):
    """Hair behind the head (it moves against the yaw): long and bob curtains, a ponytail, curls."""
    style, w, z = look.hairstyle, p.face_width, -0.3
    colour = _tone(HAIR_COLOURS[look.hair_colour], 0.8)
    if style in ("long", "bob"):
        top_x, top_y = _outline(p, -p.forehead, n=14)
        keep = top_y < 0
        half = (1.32 if style == "long" else 1.2) * w
        low, mid, centre = (1.65, 1.3, 1.2) if style == "long" else (0.75, 0.75, 0.7)
        hx = np.concatenate([top_x[keep] * 1.22, [-half, -half, -0.5 * w, 0.5 * w, half, half]])
        hy = np.concatenate([top_y[keep] * 1.12, [0, low, mid, centre, low, 0]])
        order = np.argsort(np.arctan2(hy - 0.3, hx))  # walk around the outline
        c.poly(pose(hx[order], hy[order], z=z), colour)
    elif style == "ponytail":
        c.poly(pose(*_ellipse(0.95 * w, 0.25, 0.18, 0.6, angle=-0.25), z=z), colour)
    elif style == "curly":
        jitter = np.random.default_rng(look.detail_seed).uniform(-0.1, 0.1, 13)
        a = np.linspace(-np.pi * 1.15, np.pi * 0.15, 13) + jitter  # angles around the head
        r = np.where(np.sin(a) < 0, 1.12, 1.0)
        for centre in pose(np.cos(a) * (w + 0.12) * r, np.sin(a) * p.forehead * r, z=z):
            c.dot(centre, 0.27 * pose.s, colour)


def _hair_cap(p: IdentityParams, vol: float, y_side: float, y_join: float, hairline: float, k: float):
    """Hair over the skull, in face units: the outer contour's right half and the hairline."""
    n = 22
    ox, oy = _outline(p, -p.forehead, n=n)
    right = oy[:n] <= y_side  # the right side, top to bottom
    ox, oy = ox[:n][right] * (1 + vol), np.where(oy[:n][right] < 0, oy[:n][right] * (1 + vol), oy[:n][right])
    side_y = np.linspace(y_side, y_join, 4)
    side_x = k * _half_width(p, side_y)
    t = np.linspace(0, np.pi, 9)
    top_x, top_y = side_x[-1] * np.cos(t), y_join + (hairline - y_join) * np.sin(t) ** 0.5
    inner_x = np.concatenate([side_x, top_x[1:], -side_x[::-1][1:]])
    inner_y = np.concatenate([side_y, top_y[1:], side_y[::-1][1:]])
    return (ox, oy), (inner_x, inner_y)


# Front hair cap per hairstyle: volume, y where the side locks end, y where the hairline turns
# inwards, hairline height at the middle, and the side locks' x as a fraction of the face width.
HAIR_CAPS = {
    "short": (0.07, -0.15, -0.35, -0.62, 0.99), "spiky": (0.06, -0.25, -0.4, -0.64, 0.99),
    "long": (0.1, 0.45, -0.2, -0.56, 0.93), "ponytail": (0.04, -0.2, -0.4, -0.72, 0.99),
    "curly": (0.16, 0.0, -0.3, -0.6, 0.97), "bob": (0.12, 0.55, -0.42, -0.42, 0.9),
}


def _draw_hair_front(c: _Canvas, look: Look, pose: _Pose, p: IdentityParams):
    """The cap over the skull down to the hairline, spikes or curls on it, and a few strands."""
    style, colour, w = look.hairstyle, HAIR_COLOURS[look.hair_colour], p.face_width
    if style == "bald":  # a shine on the scalp
        c.poly(pose(*_ellipse(-0.2, -0.72, 0.22, 0.1, angle=-0.5)), _shade(p.skin_rgb, 1.12))
        return
    vol, y_side, y_join, hairline, k = HAIR_CAPS[style]
    (ox, oy), (ix, iy) = _hair_cap(p, vol, y_side, y_join, hairline, k)
    outer_right, outer_left = pose(ox, oy, z=0.0), pose(-ox[::-1], oy[::-1], z=0.0)
    c.poly(np.concatenate([outer_right, pose(ix, iy), outer_left]), colour)
    if style == "spiky":
        for a in np.linspace(-2.6, -0.54, 6):
            angles, radii = np.array([a - 0.2, a + 0.2, a]), np.array([1.0, 1.0, 1.38])
            c.poly(pose(np.cos(angles) * radii * w, np.sin(angles) * radii * p.forehead, z=0.0), colour)
    elif style == "curly":
        x = np.linspace(-0.85, 0.85, 7)
        for centre in pose(x * w * k, y_join + (hairline - y_join) * np.sqrt(1 - x**2) - 0.02):
            c.dot(centre, 0.1 * pose.s, colour)
    for x0 in (-0.25, 0.05, 0.3):
        c.line(pose([x0 * w, (x0 + 0.25) * w], [-0.95 * p.forehead, hairline - 0.03]), _tone(colour, 0.75),
               0.025 * pose.s)


def _draw_head(c: _Canvas, pose: _Pose, p: IdentityParams):
    """Ears, the head and its distinctive marks (freckles, moles, a scar)."""
    skin = p.skin_rgb
    for sign in (-1, 1):
        ex, ey = _ellipse(sign * (_half_width(p, 0.15) + 0.02), 0.17, 0.09, 0.17)
        c.poly(pose(ex, ey, z=-0.1), _shade(skin, 0.9))
    c.poly(pose(*_outline(p, -p.forehead), z=0.0), skin)
    for x, y in p.freckles:
        c.dot(pose(x, y)[0], 0.018 * pose.s, _mix(skin, (120, 70, 40), 0.45))
    for x, y, r in p.moles:
        c.dot(pose(x, y)[0], r * pose.s, (60, 38, 28))
    if p.scar is not None:
        x, y, angle, half = p.scar
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        c.line(pose([x - dx, x + dx], [y - dy, y + dy]), _mix(skin, (150, 50, 60), 0.55), 0.035 * pose.s)


def _draw_nose_and_mouth(c: _Canvas, look: Look, pose: _Pose, p: IdentityParams):
    """A shaded nose wedge with nostrils; lips around a centre line whose corners rise with the
    expression, dark inside and teeth when the mouth is open."""
    e, skin = EXPRESSIONS[look.expression], p.skin_rgb
    ny, nw, top = p.nose_y, p.nose_width, p.eye_y + 0.1
    c.poly(pose([-0.03, 0.03, nw, 0.0, -nw], [top, top, ny, ny + 0.04, ny], lift=p.nose_depth * 0.7),
           _shade(skin, 0.86))
    for sign in (-1, 1):
        c.dot(pose(sign * nw * 0.5, ny + 0.02, lift=p.nose_depth * 0.5)[0], 0.03 * pose.s, _shade(skin, 0.5))
    t = np.linspace(-1, 1, 9)
    x, centre, bulge = p.mouth_width * e.mouth_width * t, p.mouth_y - e.mouth_lift * t**2, np.sqrt(1 - t**2)
    ring_x, half_open = np.concatenate([x, x[::-1]]), e.mouth_open / 2 * bulge

    def band(upper, lower):  # closed polygon between two curves over x
        return np.concatenate([upper, lower[::-1]])

    lips = band(centre - half_open - 0.8 * p.lip_thickness * bulge, centre + half_open + p.lip_thickness * bulge)
    c.poly(pose(ring_x, lips), p.lip_rgb)
    if e.mouth_open > 0:
        c.poly(pose(ring_x, band(centre - half_open, centre + half_open)), (70, 20, 25))
        c.poly(pose(ring_x * 0.8, band(centre - half_open, centre - 0.3 * half_open)), (235, 235, 228))
    else:
        c.line(pose(x, centre), _shade(p.lip_rgb, 0.55), 0.025 * pose.s)


def _draw_eyes_and_brows(c: _Canvas, look: Look, pose: _Pose, p: IdentityParams):
    """Eye whites, irises, pupils and upper lids; brows above, moved by the expression."""
    e = EXPRESSIONS[look.expression]
    ew, eh = p.eye_width, p.eye_width * p.eye_open * e.eye_open
    t = np.linspace(0, 1, 5)
    for sign in (-1, 1):
        x0 = sign * p.eye_spacing
        ex, ey = _ellipse(x0, p.eye_y, ew, eh, angle=-sign * p.eye_tilt)
        c.poly(pose(ex, ey), (242, 242, 236))
        iris = pose(x0, p.eye_y, lift=0.03)[0]
        c.dot(iris, min(0.55 * ew, 1.05 * eh) * pose.s, IRIS_COLOURS[p.iris_colour])
        c.dot(iris, min(0.25 * ew, 0.5 * eh) * pose.s, (15, 12, 12))
        c.line(pose(np.append(ex[6:], ex[0]), np.append(ey[6:], ey[0])), (40, 28, 24), 0.035 * pose.s)  # upper lid
        inner, outer = x0 - sign * ew * 0.9, x0 + sign * ew * 1.25
        by = (p.eye_y - p.brow_gap - e.brow_lift + (p.brow_angle + e.brow_frown) * (0.5 - t) * 0.35
              - p.brow_arch * 4 * t * (1 - t))
        bx, half = inner + (outer - inner) * t, p.brow_thickness * (1 - 0.45 * t) / 2
        c.poly(pose(np.concatenate([bx, bx[::-1]]), np.concatenate([by - half, (by + half)[::-1]])),
               BROW_COLOURS[p.brow_colour])


def _keypoints(look: Look, pose: _Pose, p: IdentityParams) -> np.ndarray:
    """insightface's 5 points: eye centres, nose tip, mouth corners, image-left first."""
    e = EXPRESSIONS[look.expression]
    mw, my = p.mouth_width * e.mouth_width, p.mouth_y - e.mouth_lift
    eyes = pose([-p.eye_spacing, p.eye_spacing], [p.eye_y, p.eye_y])
    nose = pose(0.0, p.nose_y, lift=p.nose_depth)
    return np.concatenate([eyes, nose, pose([-mw, mw], [my, my])]).astype(np.float32)


def _draw_glasses(c: _Canvas, look: Look, pose: _Pose, p: IdentityParams):
    """Round or square frames over the eyes, a bridge and the temples."""
    colour, ew, width = GLASSES_COLOURS[look.glasses_colour], p.eye_width, 0.04 * pose.s
    reach = (1.45 if look.glasses == "round" else 1.6) * ew  # lens half-width
    for sign in (-1, 1):
        x0 = sign * p.eye_spacing
        if look.glasses == "round":
            lx, ly = _ellipse(x0, p.eye_y, reach, reach, n=14)
        else:
            lx = x0 + reach * np.array([-1, 0, 1, 1, 1, 0, -1, -1])
            ly = p.eye_y + 1.05 * ew * np.array([-1, -1, -1, 0, 1, 1, 1, 0])
        ring = pose(lx, ly, lift=0.06)
        c.line(np.concatenate([ring, ring[:1]]), colour, width)
        temple_x = [x0 + sign * reach, sign * _half_width(p, p.eye_y)]
        c.line(pose(temple_x, [p.eye_y - 0.03, p.eye_y - 0.05], z=[0.15, -0.05]), colour, width)
    inner = p.eye_spacing - reach
    c.line(pose([-inner, 0.0, inner], [p.eye_y - 0.03, p.eye_y - 0.06, p.eye_y - 0.03], lift=0.06), colour, width)


# ---------------------------------------------------------------------------------------------
# Public entry points


def render(identity: int, look: Look, size: int = 64, *, caption_rng: np.random.Generator | None = None,
           identity_prob: float = 0.3) -> Render:
    """Draw person `identity` with `look` at size x size pixels. The image depends only on
    (identity, look, size); the caption also on `caption_rng` (default: seeded by identity and look)."""
    if int(size) != size or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    size = int(size)
    p = identity_params(identity)
    pose = _Pose(p, look, size)
    c = _Canvas(_background(look, size * SUPERSAMPLE))
    _draw_body(c, look, pose, p)
    _draw_hair_back(c, look, pose, p)
    _draw_head(c, pose, p)
    _draw_nose_and_mouth(c, look, pose, p)
    _draw_eyes_and_brows(c, look, pose, p)
    _draw_hair_front(c, look, pose, p)
    if look.glasses != "none":
        _draw_glasses(c, look, pose, p)
    image = np.asarray(c.image.reduce(SUPERSAMPLE), dtype=np.float32)
    x = np.linspace(-1, 1, size, dtype=np.float32)
    gain = look.brightness * (1 + 0.22 * look.light_direction * x)
    image = np.clip(image * gain[None, :, None], 0, 255).astype(np.uint8)
    fx, fy = _outline(p, FOREHEAD_CUT)
    face = pose(fx, fy, z=0.0)
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).polygon(face.ravel().tolist(), fill=1)
    box = tuple(face.min(0).tolist() + face.max(0).tolist())
    if caption_rng is None:
        caption_rng = np.random.default_rng([p.identity, look.detail_seed])
    return Render(
        image=image, caption=caption(look, p, caption_rng, identity_prob), box=box,
        keypoints=_keypoints(look, pose, p), mask=np.asarray(mask, dtype=bool), identity=p.identity, look=look,
    )


def render_sample(identity: int, index: int, seed: int, size: int = 64, identity_prob: float = 0.3) -> Render:
    """Image `index` of person `identity` in the data set of `seed`: look and caption come from
    np.random.default_rng([seed, identity, index]), so any item can be rebuilt on its own."""
    rng = np.random.default_rng([seed, identity, index])
    return render(identity, sample_look(rng), size, caption_rng=rng, identity_prob=identity_prob)


def render_dataset(identities: Iterable[int], n_per_identity: int, seed: int, size: int = 64,
                   identity_prob: float = 0.3) -> Iterator[Render]:
    """Yield `n_per_identity` renders per identity, identity by identity, deterministically."""
    for identity in identities:
        for index in range(n_per_identity):
            yield render_sample(identity, index, seed, size, identity_prob)
