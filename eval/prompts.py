"""The fixed evaluation prompts (data/eval/prompts.json): a PuLID-style set per world.

PuLID scores CLIP-T/CLIP-I on 20 prompts in categories (portrait, style, clothing and accessories,
action, scene, ...) and Face Sim on one fixed photoreal prompt. We keep the same shape:

- "toy": 20 prompts in the toy world's words, so the toy CLIP can judge them. Each names 1-3 look
  attributes exactly as the captions do (hyperlora/toy/identity.py), and stores them beside the
  text, so prompt adherence and look leakage are checked against ground truth. Categories: neutral
  (PuLID's fixed Face-Sim prompt), hair, clothing, accessory, expression (the toy's "action"),
  background (scene) and composite. The toy world has no art styles.
- "sdxl": photoreal prompts in PuLID's categories for the real world (no machine-readable
  attributes), with one neutral close-up photo prompt for Face Sim.

The texts carry no trigger words: the protocol runner adds the model's own. Records are
`Prompt(text, category, attributes)`; exactly one prompt per world has category "neutral".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hyperlora.toy.identity import BACKGROUND_PHRASES, EXPRESSION_PHRASES, HAIR_PHRASES, LOOK_ATTRIBUTES

PROMPTS_PATH = Path(__file__).resolve().parents[1] / "data" / "eval" / "prompts.json"
WORLDS = ("toy", "sdxl")
NEUTRAL = "neutral"  # the category of the one prompt used for ID similarity
TOY_PREFIX = "a portrait of"  # one of the captions' prefixes
MAX_TOY_ATTRIBUTES = 3

# Attributes that captions only ever name together ("short red hair", "a teal hoodie", "a striped blue wall").
_PAIRS = (("hairstyle", "hair_colour"), ("glasses", "glasses_colour"), ("clothing_type", "clothing_colour"),
          ("background_pattern", "background_colour"))  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt."""

    text: str
    category: str
    attributes: dict[str, str] = field(default_factory=dict)  # toy: look attribute -> value the text names


def _an(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_toy_attributes(attributes: dict[str, str]) -> None:
    """Refuse attributes a caption could not name: unknown names or values, a half of a pair, 'none' glasses."""
    for name, value in attributes.items():
        if name not in LOOK_ATTRIBUTES:
            raise ValueError(f"unknown look attribute {name!r}; known: {sorted(LOOK_ATTRIBUTES)}")
        if value not in LOOK_ATTRIBUTES[name]:
            raise ValueError(f"{name}={value!r} is not one of {LOOK_ATTRIBUTES[name]}")
    if not 1 <= len(attributes) <= MAX_TOY_ATTRIBUTES:
        raise ValueError(f"a toy prompt names 1-{MAX_TOY_ATTRIBUTES} look attributes, got {attributes}")
    if attributes.get("glasses") == "none":
        raise ValueError("captions never say 'no glasses': leave glasses out instead")
    for first, second in _PAIRS:
        bald = first == "hairstyle" and attributes.get(first) == "bald"
        if bald and second in attributes:
            raise ValueError("a bald person has no visible hair colour")
        if (first in attributes) != (second in attributes) and not bald:
            raise ValueError(f"captions name {first} and {second} together, got {attributes}")


def toy_prompt_text(attributes: dict[str, str]) -> str:
    """The caption-style text naming exactly `attributes`, in the captions' order and phrases."""
    check_toy_attributes(attributes)
    a = attributes
    if a.get("hairstyle") == "bald":
        person = "a bald person"
    elif "hairstyle" in a:
        person = "a person with " + HAIR_PHRASES[a["hairstyle"]].format(a["hair_colour"])
    else:
        person = "a person"
    parts = [f"{TOY_PREFIX} {person}"]
    worn = [f"{a['glasses']} {a['glasses_colour']} glasses"] if "glasses" in a else []
    if "clothing_type" in a:
        worn.append(_an(f"{a['clothing_colour']} {a['clothing_type']}"))
    if worn:
        parts.append("wearing " + _join(worn))
    if "expression" in a:
        parts.append(EXPRESSION_PHRASES[a["expression"]])
    if "background_pattern" in a:
        parts.append("in front of " + BACKGROUND_PHRASES[a["background_pattern"]].format(a["background_colour"]))
    return ", ".join(parts)


def load_prompts(world: str, path: str | Path = PROMPTS_PATH) -> list[Prompt]:
    """The prompts of `world` ("toy" or "sdxl"), checked: toy attributes must be valid and match the text."""
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")
    records = json.loads(Path(path).read_text())[world]
    prompts = []
    for i, record in enumerate(records):
        unknown = set(record) - {"text", "category", "attributes"}
        if unknown or not record.get("text") or not record.get("category"):
            raise ValueError(f"{path}: {world}[{i}] needs text and category (and attributes), got keys {sorted(record)}")
        prompt = Prompt(record["text"], record["category"], dict(record.get("attributes", {})))
        if world == "toy" and toy_prompt_text(prompt.attributes) != prompt.text:
            raise ValueError(f"{path}: toy[{i}] text {prompt.text!r} does not match its attributes "
                             f"{prompt.attributes} (expected {toy_prompt_text(prompt.attributes)!r})")  # fmt: skip
        if world == "sdxl" and prompt.attributes:
            raise ValueError(f"{path}: sdxl[{i}] has attributes, but only the toy world can check them")
        prompts.append(prompt)
    neutral = [p for p in prompts if p.category == NEUTRAL]
    if len(neutral) != 1:
        raise ValueError(f"{path}: {world} needs exactly one {NEUTRAL!r} prompt, got {len(neutral)}")
    return prompts


def neutral_prompt(world: str, path: str | Path = PROMPTS_PATH) -> Prompt:
    """The one fixed prompt for ID similarity (PuLID scores Face Sim on a single photoreal prompt)."""
    return next(p for p in load_prompts(world, path) if p.category == NEUTRAL)
