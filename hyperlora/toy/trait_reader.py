"""An identity judge that never conditioned the model: a CNN that reads a person's identity traits.

The toy ArcFace both conditions HyperLoRA's stage 3 and judges ID similarity, so a hypernetwork could in principle
please that one network without drawing the person. The trait reader is a second, independent judge: an
`AttributeCNN` with one head per identity trait (`teacher.identity_trait_labels`: skin tone, iris and brow colour,
moles, freckles, scar, and every face-geometry trait cut into quantile bins), trained on renders against the
renderer's ground truth. Its score for an image of person p, `trait_match`, is the fraction of p's traits it reads
correctly, over the traits it reads reliably on held-out renders ("readable": validation accuracy at least
`READABLE_MARGIN` above the majority-class rate). Renders of p give its ceiling (the card's `match_on_renders`), renders
of someone else scored against p its floor (`match_other_person`).

Toy only, with the reason: only the toy world knows each person's true traits; a real photo has no such ground truth.

`python -m hyperlora.toy train-traits --out data/toy/traits` trains and evaluates it (about 15 min on one thread).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cards import config_dict, write_model_card
from .data import split_renders, to_tensor
from .teacher import AttributeCNN, fit_attribute_cnn, identity_trait_labels

WEIGHTS = "trait_reader.safetensors"
READABLE_MARGIN = 0.15  # a trait counts when the reader beats the majority class by this much on 'val' renders


@dataclass
class TraitReaderConfig:
    """Training of the trait reader (defaults: about 15 min on one thread)."""

    num_train: int = 2000  # training identities, the first of the 'train' split (never a val or test person)
    images_per_identity: int = 4  # looks per person: the reader must read the person through hair, pose, light
    data_seed: int = 0
    val_per_identity: int = 2  # renders per 'val' person for the accuracies and the card's figures
    bins: int = 4  # quantile bins per continuous trait (edges from the training people)
    widths: tuple[int, ...] = (32, 64, 96, 128)
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3  # one-cycle peak
    seed: int = 0
    threads: int = 1

    @classmethod
    def smoke(cls) -> TraitReaderConfig:
        return cls(num_train=16, images_per_identity=2, val_per_identity=1, widths=(8, 16), steps=4, batch_size=8)


class TraitReader:
    """A trained reader: `read(images)` gives trait classes, `match(images, identity)` the fraction read right."""

    def __init__(self, model: AttributeCNN, classes: dict[str, int], edges: dict[str, np.ndarray],
                 readable: list[str]):  # fmt: skip
        self.model, self.classes, self.edges = model.eval(), dict(classes), edges
        self.names = list(classes)
        self.readable = [self.names.index(name) for name in readable]
        if not self.readable:
            raise ValueError("the trait reader reads no trait above chance: retrain it (python -m hyperlora.toy "
                             "train-traits) before judging identity with it")  # fmt: skip

    @classmethod
    def load(cls, folder: str | Path) -> TraitReader:
        path = Path(folder) / WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"no trait reader at {path}: python -m hyperlora.toy train-traits --out {folder}")
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
            state = {k: f.get_tensor(k) for k in f.keys()}
        model = AttributeCNN(widths=tuple(meta["config"]["widths"]), classes=meta["classes"])
        model.load_state_dict(state)
        edges = {k: np.asarray(v) for k, v in meta["edges"].items()}
        return cls(model, meta["classes"], edges, meta["readable"])

    def truth(self, identities) -> torch.Tensor:
        """[N, traits] true classes of these people (the training people's bin edges)."""
        return identity_trait_labels(identities, edges=self.edges)[0]

    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 256) -> torch.Tensor:
        """[N, traits] classes read from uint8 images [N, H, W, 3]."""
        out = []
        for i in range(0, len(images), batch):
            _, logits = self.model(to_tensor(images[i : i + batch]))
            out.append(torch.stack([x.argmax(-1) for x in logits], 1))
        return torch.cat(out)

    def match(self, images: np.ndarray, identity: int) -> np.ndarray:
        """Per image, the fraction of the readable traits read as person `identity`'s own."""
        read = self.read(images)[:, self.readable]
        truth = self.truth([identity])[:, self.readable]
        return (read == truth).float().mean(1).numpy()


def save_trait_reader(folder: str | Path, model: AttributeCNN, config: TraitReaderConfig, classes: dict[str, int],
                      edges: dict[str, np.ndarray], readable: list[str]) -> Path:  # fmt: skip
    """`trait_reader.safetensors`: the weights, with the config, heads, bin edges and readable traits as metadata."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": config_dict(config), "classes": classes, "readable": list(readable),
            "edges": {k: np.asarray(v).tolist() for k, v in edges.items()}}  # fmt: skip
    path = Path(folder) / WEIGHTS
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def _evaluate(reader: AttributeCNN, classes: dict, edges: dict, config: TraitReaderConfig) -> dict:
    """Per-trait 'val' accuracy against the majority-class rate; the readable traits; match on renders of the
    person (ceiling) and of the next person (floor)."""
    val = split_renders("val", None, config.val_per_identity, config.data_seed + 1)
    truth = identity_trait_labels(val["identities"], edges=edges)[0]
    probe = TraitReader(reader, classes, edges, list(classes))  # every trait, to measure each
    read = probe.read(val["images"])
    accuracy = (read == truth).float().mean(0).numpy()
    chance = np.array([np.bincount(truth[:, j].numpy(), minlength=n).max() / len(truth) for j, n in enumerate(classes.values())])
    readable = [name for name, a, c in zip(classes, accuracy, chance) if a - c >= READABLE_MARGIN]
    cols = [list(classes).index(name) for name in readable]
    other = truth.roll(config.val_per_identity, 0)  # the next person's traits (renders are grouped by person)
    match_own = (read[:, cols] == truth[:, cols]).float().mean(1) if cols else torch.zeros(len(read))
    match_other = (read[:, cols] == other[:, cols]).float().mean(1) if cols else torch.zeros(len(read))
    per_trait = {name: {"accuracy": float(a), "majority": float(c)} for name, a, c in zip(classes, accuracy, chance)}
    return {"per_trait": per_trait, "readable": readable, "match_on_renders": float(match_own.mean()),
            "match_other_person": float(match_other.mean()), "n_val_images": len(read)}  # fmt: skip


def train_trait_reader(out_dir: str | Path, config: TraitReaderConfig | None = None) -> dict:
    """Train on 'train' renders, evaluate on 'val' renders, save `trait_reader.safetensors` and its model card."""
    config = config or TraitReaderConfig()
    torch.set_num_threads(config.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    train = split_renders("train", config.num_train, config.images_per_identity, config.data_seed)
    labels, classes, edges = identity_trait_labels(train["identities"], bins=config.bins)
    model = fit_attribute_cnn(to_tensor(train["images"]), labels, widths=config.widths, steps=config.steps,
                              batch_size=config.batch_size, lr=config.lr, seed=config.seed, classes=classes,
                              desc="trait reader")  # fmt: skip
    seconds = time.time() - start
    figures = _evaluate(model, classes, edges, config)
    save_trait_reader(out, model, config, classes, edges, figures["readable"])
    gap = figures["match_on_renders"] - figures["match_other_person"]
    write_model_card(out, name="toy identity-trait reader", config=config, train_seconds=seconds, figures=figures,
                     summary="reads identity traits from a 64 px portrait: the ID judge that never conditioned "
                             "HyperLoRA (eval's trait_match)",
                     gates={"reads at least 5 traits": len(figures["readable"]) >= 5,
                            "own traits beat the next person's by 0.2 on renders": gap >= 0.2})  # fmt: skip
    return figures
