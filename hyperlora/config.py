"""The hypernetwork's configuration: one dataclass, JSON presets that hold only what differs.

The defaults are the released `sdxl_hyper_id_lora_v1` configuration (facts §1.1), not the
official dataclass defaults, which do not match the checkpoints (official issue #48).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ENCODER_TYPES = ("clip", "arcface")

def strict_from_dict(cls, values: dict):
    """`cls(**values)` for a dataclass, raising on keys that are not fields (no setting is dropped silently).

    JSON lists become tuples where the field's default is a tuple, so configs round-trip through JSON.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(fields)}")
    values = {k: tuple(v) if isinstance(v, list) and isinstance(fields[k].default, tuple) else v for k, v in values.items()}
    return cls(**values)


# Each target attention module owns 8 resampler queries: (down, up) for to_q, to_k, to_v, to_out.
TOKENS_PER_MODULE = 8


@dataclass
class HyperLoRAConfig:
    """Shapes of the hypernetwork; the target modules come from the UNet (see `targets.py`)."""

    hyper_dim: int = 128  # K: basis matrices per LoRA matrix; coefficient vectors are K-dimensional
    rank: int = 8  # ID-LoRA rank; the Base-LoRA uses rank // 2 (see base_rank)
    num_id_tokens: int = 16  # ArcFace embedding -> this many context tokens for the resampler
    id_embed_dim: int = 512  # ArcFace embedding size (antelopev2 glintr100: 512)
    dim: int = 1024  # resampler width; equals the CLIP vision hidden size (ViT-L/14: 1024)
    depth: int = 4  # Perceiver blocks in each resampler
    heads: int = 12  # attention heads; inner dim = heads * dim_head (768 in the release)
    dim_head: int = 64
    ff_mult: int = 4  # feed-forward hidden = ff_mult * dim
    encoder_types: tuple[str, ...] = ("clip", "arcface")  # ID-branch conditions; arcface is `x`
    has_base_lora: bool = False  # the released checkpoints have no Base-LoRA
    init_std: float = 1.0  # down-basis init: init_std / sqrt(in_features); up bases start at zero
    trigger_words: str = "fcsks fxhks fhyks"  # rare tokens the ID-LoRA is tied to; prompts start with them

    def __post_init__(self):
        self.encoder_types = tuple(self.encoder_types)
        unknown = set(self.encoder_types) - set(ENCODER_TYPES)
        if unknown or not self.encoder_types or len(set(self.encoder_types)) != len(self.encoder_types):
            raise ValueError(f"encoder_types must be a non-empty subset of {ENCODER_TYPES}, got {self.encoder_types}")
        if self.rank < 2 or self.rank % 2:
            raise ValueError(f"rank must be even and >= 2 (the Base-LoRA uses rank // 2), got {self.rank}")
        for name in ("hyper_dim", "num_id_tokens", "id_embed_dim", "dim", "depth", "heads", "dim_head", "ff_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def base_rank(self) -> int:
        return self.rank // 2

    @property
    def n_conds(self) -> int:
        return len(self.encoder_types)

    @staticmethod
    def alpha(rank: int) -> float:
        """The export convention of the release: alpha = rank / 2, so every LoRA is scaled by 0.5."""
        return rank * 0.5

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["encoder_types"] = list(self.encoder_types)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "HyperLoRAConfig":
        return strict_from_dict(cls, values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HyperLoRAConfig":
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(values)


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".json")] for p in resources.files("hyperlora.presets").iterdir() if p.name.endswith(".json"))


def preset(name: str, **overrides) -> HyperLoRAConfig:
    """A named preset from `hyperlora/presets/<name>.json` (only the fields that differ), then overrides."""
    path = resources.files("hyperlora.presets") / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; presets: {list_presets()}")
    values = json.loads(path.read_text())
    values.pop("_comment", None)
    values.update(overrides)
    return HyperLoRAConfig.from_dict(values)
