"""Who is in a toy portrait (identity traits, splits), how they are shown (the look) and how
that is put into words (captions).

An identity is an integer; `identity_params(i)` derives every trait from `np.random.default_rng(i)`,
so a person looks the same in every image. A `Look` holds what changes from image to image: a
small named vocabulary per categorical attribute (`LOOK_ATTRIBUTES`, what prompts and the zero-shot
evaluation talk about) plus continuous pose, position and lighting jitter. `caption` describes a
look in plain English. The renderer (`render.py`) re-exports all of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# ---------------------------------------------------------------------------------------------
# Identity

# Named skin tones (captions use the name); each identity adds a small jitter to the RGB value.
SKIN_TONES = {
    "pale": (248, 224, 208), "fair": (238, 200, 172), "light": (222, 176, 142),
    "medium": (198, 146, 108), "olive": (176, 142, 96), "tan": (160, 110, 74),
    "brown": (120, 80, 54), "dark": (82, 54, 38),
}
IRIS_COLOURS = {
    "brown": (112, 70, 38), "dark brown": (58, 36, 22), "blue": (60, 120, 210), "green": (60, 150, 80),
    "hazel": (150, 115, 45), "grey": (135, 145, 158), "amber": (200, 135, 30),
}
BROW_COLOURS = {
    "black": (28, 24, 22), "dark brown": (62, 42, 28), "brown": (105, 72, 44),
    "auburn": (130, 58, 30), "blonde": (190, 160, 105), "grey": (130, 128, 124),
}


@dataclass(frozen=True)
class IdentityParams:
    """Every trait of one person, in face units: the head spans y in [-1, 1], y grows downwards."""

    identity: int
    face_width: float  # half-width of the head at eye level (cheek to cheek / 2)
    forehead: float  # height of the head above the eyes' line, relative to 1
    chin: float  # height of the face below the eyes' line, relative to 1 (long vs short face)
    jaw_taper: float  # 0: square jaw, large: narrow pointed chin
    squareness: float  # superellipse exponent of the outline: 2 = ellipse, larger = boxier
    skin_tone: str  # key of SKIN_TONES (captions may mention it)
    skin_rgb: tuple[int, int, int]
    eye_width: float  # half-width of one eye
    eye_open: float  # eye height / eye width
    eye_spacing: float  # |x| of each eye centre
    eye_y: float  # y of the eyes' line
    eye_tilt: float  # radians; positive raises the outer corners
    iris_colour: str  # key of IRIS_COLOURS (captions may mention it)
    brow_colour: str  # key of BROW_COLOURS
    brow_thickness: float
    brow_angle: float  # positive lowers the inner ends (a stern look)
    brow_arch: float
    brow_gap: float  # distance from the eye centre up to the brow
    nose_y: float  # y of the nose tip (nose length)
    nose_width: float  # half-width of the nostrils
    nose_depth: float  # how far the tip stands out of the face (moves with yaw)
    mouth_y: float
    mouth_width: float  # half-width, corner to centre
    lip_thickness: float
    lip_rgb: tuple[int, int, int]
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius) per mole, maybe none
    freckles: tuple[tuple[float, float], ...]  # (x, y) per freckle, maybe none
    scar: tuple[float, float, float, float] | None  # (x, y, angle, half-length) or None

    @property
    def marks(self) -> list[str]:
        """Distinctive marks in plain English, for captions."""
        names = ["freckles"] if self.freckles else []
        names += ["a mole"] * (len(self.moles) == 1) + ["moles"] * (len(self.moles) > 1)
        return names + ["a scar"] * (self.scar is not None)


@lru_cache(maxsize=65536)
def identity_params(identity: int) -> IdentityParams:
    """All traits of person `identity`, drawn from a numpy Generator seeded by the id."""
    if int(identity) != identity or identity < 0:
        raise ValueError(f"identity must be a non-negative integer, got {identity!r}")
    rng = np.random.default_rng(int(identity))

    def u(lo, hi):  # one uniform draw; keyword arguments below are drawn in the order written
        return float(rng.uniform(lo, hi))

    skin_tone = str(rng.choice(list(SKIN_TONES)))
    skin = np.clip(np.array(SKIN_TONES[skin_tone]) + rng.integers(-10, 11, 3), 0, 255)
    lip = np.clip(skin * u(0.62, 0.8) + np.array([70, 10, 20]) * u(0.2, 0.8), 0, 255)
    n_moles = int(rng.choice([0, 0, 1, 1, 2, 3]))
    moles = tuple((u(-0.5, 0.5), u(-0.45, 0.85), u(0.03, 0.05)) for _ in range(n_moles))
    freckles = ()
    if rng.random() < 0.25:
        freckles = tuple((s * u(0.12, 0.5), u(0.15, 0.45)) for s in (-1, 1) for _ in range(7))
    scar = (u(-0.45, 0.45), u(-0.5, 0.7), u(-1.2, 1.2), u(0.12, 0.22)) if rng.random() < 0.2 else None
    return IdentityParams(
        identity=int(identity),
        face_width=u(0.66, 0.86), forehead=u(0.92, 1.06), chin=u(0.9, 1.08),
        jaw_taper=u(0.0, 0.45), squareness=u(2.0, 2.8),
        skin_tone=skin_tone, skin_rgb=tuple(int(c) for c in skin),
        eye_width=u(0.12, 0.17), eye_open=u(0.45, 0.75), eye_spacing=u(0.25, 0.34),
        eye_y=u(-0.04, 0.08), eye_tilt=u(-0.18, 0.18),
        iris_colour=str(rng.choice(list(IRIS_COLOURS))), brow_colour=str(rng.choice(list(BROW_COLOURS))),
        brow_thickness=u(0.035, 0.085), brow_angle=u(-0.12, 0.22), brow_arch=u(0.0, 0.06),
        brow_gap=u(0.13, 0.2),
        nose_y=u(0.27, 0.38), nose_width=u(0.07, 0.13), nose_depth=u(0.12, 0.25),
        mouth_y=u(0.58, 0.7), mouth_width=u(0.17, 0.28), lip_thickness=u(0.03, 0.07),
        lip_rgb=tuple(int(c) for c in lip),
        moles=moles, freckles=freckles, scar=scar,
    )


# ---------------------------------------------------------------------------------------------
# Splits: train identities start at 0; the held-out ranges sit at fixed offsets far above them.

DEFAULT_NUM_TRAIN = 5000
VAL_OFFSET = 900_000  # identities used to pick checkpoints; never trained on
TEST_OFFSET = 1_000_000  # identities that no model ever sees before the final evaluation
NUM_HELDOUT = 200  # identities in each held-out split


def split_identities(split: str, num_train: int = DEFAULT_NUM_TRAIN) -> range:
    """The identities of `split` ("train", "val" or "test"); train is 0..num_train-1."""
    if not 0 < num_train <= VAL_OFFSET:
        raise ValueError(f"num_train must be in 1..{VAL_OFFSET} so train stays below the held-out ids, got {num_train}")
    ranges = {
        "train": range(0, num_train),
        "val": range(VAL_OFFSET, VAL_OFFSET + NUM_HELDOUT),
        "test": range(TEST_OFFSET, TEST_OFFSET + NUM_HELDOUT),
    }
    if split not in ranges:
        raise ValueError(f"split must be one of {sorted(ranges)}, got {split!r}")
    return ranges[split]


def is_held_out(identity: int) -> bool:
    """True for val and test identities, which no trainer may use."""
    return identity >= VAL_OFFSET


SPLITS = {name: split_identities(name) for name in ("train", "val", "test")}

# ---------------------------------------------------------------------------------------------
# Look

HAIR_COLOURS = {
    "black": (30, 26, 26), "brown": (105, 66, 36), "blonde": (226, 192, 118), "red": (200, 62, 30),
    "grey": (150, 150, 150), "white": (238, 236, 230), "blue": (40, 90, 210), "pink": (240, 120, 185),
}
PALETTE = {  # clothing and background colours
    "white": (236, 236, 232), "black": (36, 36, 40), "grey": (128, 128, 132), "red": (200, 40, 40),
    "orange": (236, 130, 30), "yellow": (236, 206, 50), "green": (50, 150, 70), "blue": (40, 90, 200),
    "purple": (120, 60, 170), "pink": (236, 130, 180), "brown": (120, 78, 44), "teal": (30, 140, 140),
}
GLASSES_COLOURS = {"black": (20, 20, 20), "gold": (212, 175, 55), "red": (200, 30, 30), "blue": (30, 70, 200)}

# The named values of every categorical look attribute; evaluation code classifies against these.
LOOK_ATTRIBUTES = {
    "background_colour": list(PALETTE),
    "background_pattern": ["plain", "striped", "dotted", "gradient", "checkered"],
    "clothing_colour": list(PALETTE),
    "clothing_type": ["t-shirt", "hoodie", "suit", "sweater", "turtleneck"],
    "hairstyle": ["short", "long", "bald", "ponytail", "curly", "bob", "spiky"],
    "hair_colour": list(HAIR_COLOURS),
    "expression": ["neutral", "smiling", "open mouth", "frowning", "surprised"],
    "glasses": ["none", "round", "square"],
    "glasses_colour": list(GLASSES_COLOURS),
}


@dataclass(frozen=True)
class Look:
    """What varies per image. Build it from explicit values (`Look(hair_colour="red")`) or sample it.

    `hair_colour` is invisible when `hairstyle == "bald"` and `glasses_colour` when
    `glasses == "none"`; `visible_attributes` drops them.
    """

    background_colour: str = "grey"
    background_pattern: str = "plain"
    clothing_colour: str = "blue"
    clothing_type: str = "t-shirt"
    hairstyle: str = "short"
    hair_colour: str = "brown"
    expression: str = "neutral"
    glasses: str = "none"
    glasses_colour: str = "black"
    yaw: float = 0.0  # radians, head turned; positive moves the features towards image-right
    roll: float = 0.0  # radians, head tilted in the image plane (clockwise positive)
    shift_x: float = 0.0  # head and body offset, fraction of the image size
    shift_y: float = 0.0
    scale: float = 1.0  # head and body size relative to the default framing
    brightness: float = 1.0  # global light level
    light_direction: float = 0.0  # -1: lit from image-left, +1: lit from image-right
    detail_seed: int = 0  # pattern phase, stripe angle, curl positions

    def __post_init__(self):
        for name, values in LOOK_ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")


# Sampling probabilities where they are not uniform (glasses hide the eyes, so only half the time).
LOOK_PRIORS = {"glasses": [0.5, 0.25, 0.25]}
# Ranges of the continuous look fields drawn by `sample_look`.
LOOK_RANGES = {
    "yaw": (-0.35, 0.35), "roll": (-0.2, 0.2), "shift_x": (-0.05, 0.05), "shift_y": (-0.04, 0.04),
    "scale": (0.92, 1.08), "brightness": (0.8, 1.15), "light_direction": (-1.0, 1.0),
}


def sample_look(rng: np.random.Generator, **fixed) -> Look:
    """A random look: categorical attributes over LOOK_ATTRIBUTES (uniform unless LOOK_PRIORS says
    otherwise), jitter uniform over LOOK_RANGES. Keyword arguments fix attributes
    (`hair_colour="red"`) without changing the draws of the others."""
    values = {name: str(rng.choice(options, p=LOOK_PRIORS.get(name))) for name, options in LOOK_ATTRIBUTES.items()}
    values.update({name: float(rng.uniform(lo, hi)) for name, (lo, hi) in LOOK_RANGES.items()})
    values["detail_seed"] = int(rng.integers(0, 2**31))
    unknown = set(fixed) - set(values)
    if unknown:
        raise ValueError(f"unknown look attributes {sorted(unknown)}; known: {sorted(values)}")
    return Look(**{**values, **fixed})


def visible_attributes(look: Look) -> dict[str, str]:
    """The categorical attributes that can be seen in the image (ground truth for evaluation)."""
    values = {name: getattr(look, name) for name in LOOK_ATTRIBUTES}
    if look.hairstyle == "bald":
        del values["hair_colour"]
    if look.glasses == "none":
        del values["glasses_colour"]
    return values


# ---------------------------------------------------------------------------------------------
# Captions

HAIR_PHRASES = {"short": "short {} hair", "long": "long {} hair", "ponytail": "{} hair in a ponytail",
                "curly": "curly {} hair", "bob": "a {} bob", "spiky": "spiky {} hair"}
EXPRESSION_PHRASES = {"neutral": "with a neutral expression", "smiling": "smiling",
                      "open mouth": "with an open mouth", "frowning": "frowning", "surprised": "looking surprised"}
BACKGROUND_PHRASES = {"plain": "a plain {} wall", "striped": "a striped {} wall", "dotted": "a dotted {} wall",
                      "gradient": "a {} gradient background", "checkered": "a checkered {} wall"}
CAPTION_PREFIXES = ("a portrait of", "a photo of", "a picture of")


def a_or_an(word: str) -> str:
    """The indefinite article before `word` ("an orange hoodie", "a teal suit")."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(look: Look, params: IdentityParams, rng: np.random.Generator, identity_prob: float = 0.3) -> str:
    """Plain-English description of the look. Each visible identity trait (skin tone, eye colour,
    distinctive marks) is mentioned with probability `identity_prob`; the identity is never named.
    Always draws the same number of values from `rng`."""
    prefix = CAPTION_PREFIXES[int(rng.integers(len(CAPTION_PREFIXES)))]
    mention = [int(m) for m in rng.random(3) < identity_prob]
    traits = [f"{params.skin_tone} skin"] * mention[0] + [f"{params.iris_colour} eyes"] * mention[1]
    traits += params.marks * mention[2]
    if look.hairstyle == "bald":
        person, features = "a bald person", traits
    else:
        person, features = "a person", [HAIR_PHRASES[look.hairstyle].format(look.hair_colour)] + traits
    if features:
        person += " with " + _join(features)
    worn = [a_or_an(f"{look.clothing_colour} {look.clothing_type}")]
    if look.glasses != "none":
        worn.insert(0, f"{look.glasses} {look.glasses_colour} glasses")
    background = BACKGROUND_PHRASES[look.background_pattern].format(look.background_colour)
    return (f"{prefix} {person}, wearing {_join(worn)}, {EXPRESSION_PHRASES[look.expression]}, "
            f"in front of {background}")


NONSENSE_LETTERS = "bcdfghjklmnpqrstvwxzbcdfghkpstxaeiouy"  # mostly consonants: words no caption uses


def nonsense_prefix(caption: str, rng: np.random.Generator, *, avoid: str = "fcsks fxhks fhyks") -> str:
    """1-3 rare, meaningless words of 4-6 letters before `caption` ("qzkrt bxwl, a portrait of ..."), never the
    words in `avoid` (HyperLoRA's trigger words): a base model trained on some such captions learns that rare
    words carry nothing, as SDXL has, so the trigger words alone leave its output as it is."""
    words = []
    while len(words) < int(rng.integers(1, 4)):
        word = "".join(rng.choice(list(NONSENSE_LETTERS), size=int(rng.integers(4, 7))))
        if word not in avoid.split():
            words.append(word)
    return f"{' '.join(words)}, {caption}"
