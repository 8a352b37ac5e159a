"""What the toy CLIP is trained on besides its images: batches, captions and the training-time losses.

`hyperlora.toy.clip.train_clip` combines them: `HardBatches` draws the batches; `partial_caption` rewrites
captions to name a few attributes, and `caption_targets` marks every caption true of an image, for
`multi_positive_loss` (UniCL's contrastive loss); `label_loss` classifies every look attribute through the
text tower; `AttributeHeads` and `DistillHeads` supervise the vision tower alone (labels, and a CNN
teacher's features) and are thrown away after training.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from .identity import (BACKGROUND_PHRASES, CAPTION_PREFIXES, EXPRESSION_PHRASES, HAIR_PHRASES, LOOK_ATTRIBUTES,
                       a_or_an)  # fmt: skip


class HardBatches(torch.utils.data.Sampler):
    """Endless batches of indices. With probability `hard` a batch is built around a random anchor:
    images sharing its values of 1..`max_fixed` random look attributes (topped up at random), so the
    contrastive loss cannot separate them by those attributes alone and must learn the others.
    Uniform batches only teach the most telling attribute (background colour) for a long time."""

    def __init__(self, attributes: list[dict], batch_size: int, *, hard: float, max_fixed: int, seed: int):
        super().__init__()
        self.attributes, self.batch_size, self.hard, self.max_fixed = attributes, batch_size, hard, max_fixed
        self.groups = {name: {} for name in LOOK_ATTRIBUTES}  # attribute -> value -> indices ("" = not visible)
        for i, values in enumerate(attributes):
            for name in LOOK_ATTRIBUTES:
                self.groups[name].setdefault(values[name], []).append(i)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.attributes) // self.batch_size  # batches per pass over the data; iteration never ends

    def _hard_batch(self) -> np.ndarray:
        anchor = self.attributes[self.rng.integers(len(self.attributes))]
        fixed = self.rng.choice(list(LOOK_ATTRIBUTES), self.rng.integers(1, self.max_fixed + 1), replace=False)
        members = set.intersection(*(set(self.groups[name][anchor[name]]) for name in fixed))
        chosen = self.rng.permutation(sorted(members))[: self.batch_size]
        rest = np.setdiff1d(np.arange(len(self.attributes)), chosen)
        return np.concatenate([chosen, self.rng.choice(rest, self.batch_size - len(chosen), replace=False)])

    def __iter__(self):
        while True:
            if self.rng.random() < self.hard:
                yield self._hard_batch().tolist()
            else:
                yield self.rng.choice(len(self.attributes), self.batch_size, replace=False).tolist()


def partial_caption(attributes: dict[str, str], rng: np.random.Generator, keep: float = 0.4
                    ) -> tuple[str, dict[str, str]]:
    """A caption in the captions' words naming a random subset of the visible look attributes (each
    kept with probability `keep`, at least one), and that subset {attribute: value}: the caption is
    true of every image that has those values. Short texts like the zero-shot prompts ("a photo of a
    person with red hair", "a portrait of a person wearing a hoodie"). "No glasses" is never named:
    captions say nothing of absent glasses."""
    visible = {name: value for name, value in attributes.items() if value and value != "none"}
    named = {name: value for name, value in visible.items() if rng.random() < keep}
    if not named:
        name = str(rng.choice(sorted(visible)))
        named = {name: visible[name]}
    n = named.get

    def words(text: str) -> str:  # drop the double spaces an unnamed colour leaves
        return " ".join(text.split())

    hair = ""
    if n("hairstyle") and n("hairstyle") != "bald":
        hair = words(HAIR_PHRASES[n("hairstyle")].format(n("hair_colour") or ""))
    elif n("hair_colour"):
        hair = f"{n('hair_colour')} hair"
    person = ("a bald person" if n("hairstyle") == "bald" else "a person") + (f" with {hair}" if hair else "")
    worn = []
    if n("glasses") or n("glasses_colour"):
        worn.append(words(f"{n('glasses') or ''} {n('glasses_colour') or ''} glasses"))
    if n("clothing_type"):
        worn.append(a_or_an(words(f"{n('clothing_colour') or ''} {n('clothing_type')}")))
    elif n("clothing_colour"):
        worn.append(f"{n('clothing_colour')} clothes")
    parts = [f"{CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]} {person}"]
    parts += [f"wearing {' and '.join(worn)}"] * bool(worn)
    if n("expression"):
        parts.append(EXPRESSION_PHRASES[n("expression")])
    if n("background_pattern"):
        parts.append("in front of " + words(BACKGROUND_PHRASES[n("background_pattern")].format(
            n("background_colour") or "")))
    elif n("background_colour"):
        parts.append(f"in front of a {n('background_colour')} background")
    return ", ".join(parts), named


def caption_targets(named: list[dict[str, str] | None], attributes: list[dict[str, str]]) -> torch.Tensor:
    """Which caption is true of which image: bool [images, captions]. A partial caption (its named
    {attribute: value}) is true of every image with those values; a full caption (None) only of its
    own image (it also names identity traits). The diagonal is always true."""
    truth = torch.eye(len(attributes), dtype=torch.bool)
    for j, names in enumerate(named):
        if names:
            for i, values in enumerate(attributes):
                truth[i, j] |= all(values[a] == v for a, v in names.items())
    return truth


def multi_positive_loss(logits_per_image: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every true (image, caption) pair is a positive, weighted equally within
    a row (UniCL, Yang et al. 2022): without it, "a person smiling" would be pushed away from every
    other smiling image in the batch. With an identity `truth` this is CLIP's loss exactly."""
    target = truth.float()
    log_i2t = F.log_softmax(logits_per_image, dim=1)
    log_t2i = F.log_softmax(logits_per_image, dim=0)
    i2t = -(target * log_i2t).sum(1) / target.sum(1)
    t2i = -(target * log_t2i).sum(0) / target.sum(0)
    return (i2t.mean() + t2i.mean()) / 2


def label_texts(rng: np.random.Generator) -> dict[str, tuple[list[str], list[str]]]:
    """Per look attribute: its nameable values and one freshly worded single-attribute caption for each
    (`partial_caption` naming that value alone). Glasses also get "none", worded as a caption that names
    nothing: the most specific true text for a face without glasses."""
    out = {}
    for attribute, values in LOOK_ATTRIBUTES.items():
        texts = []
        for value in values:
            if value == "none":
                texts.append(f"{CAPTION_PREFIXES[rng.integers(len(CAPTION_PREFIXES))]} a person")
                continue
            full = {name: "" for name in LOOK_ATTRIBUTES} | {attribute: value}
            texts.append(partial_caption(full, rng, keep=1.0)[0])
        out[attribute] = (list(values), texts)
    return out


def label_loss(model: CLIPModel, tokenizer: CLIPTokenizer, image_embeds: torch.Tensor, attributes: list[dict],
               rng: np.random.Generator, device) -> torch.Tensor:  # fmt: skip
    """UniCL's image-label term (Yang et al. 2022): every look attribute is a classification of the batch's
    images among that attribute's single-attribute captions, with the CLIP similarity as logits. It gives
    every attribute a gradient on every image each step; the zero-shot check uses other wordings (the
    prompt ensembles of `attribute_prompts`; only "no glasses" is worded alike, as the bare subject) on
    held-out identities."""
    classes = label_texts(rng)
    texts = [text for _, wording in classes.values() for text in wording]
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=77, return_tensors="pt").to(device)
    text_embeds = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    scale, start, losses = model.logit_scale.exp(), 0, []
    for attribute, (values, wording) in classes.items():
        block = text_embeds[start : start + len(wording)]
        start += len(wording)
        truth = [a[attribute] or ("none" if attribute == "glasses" else "") for a in attributes]
        keep = [i for i, t in enumerate(truth) if t]
        if keep:
            target = torch.tensor([values.index(truth[i]) for i in keep], device=block.device)
            losses.append(F.cross_entropy(scale * image_embeds[keep] @ block.T, target))
    return torch.stack(losses).mean()


class AttributeHeads(torch.nn.Module):
    """One linear classifier per look attribute on a pooled image feature (training-time supervision only)."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, len(values))
                                          for name, values in LOOK_ATTRIBUTES.items()})  # fmt: skip

    def forward(self, features: torch.Tensor, attributes: list[dict]) -> torch.Tensor:
        """Mean cross-entropy over attributes; images where an attribute is invisible (bald hair colour,
        no glasses' colour) are left out of that attribute's term."""
        losses = []
        for name, head in self.heads.items():
            values = LOOK_ATTRIBUTES[name]
            target = torch.tensor([values.index(a[name]) if a[name] else -100 for a in attributes],
                                  device=features.device)  # fmt: skip
            if (target >= 0).any():
                losses.append(F.cross_entropy(head(features), target, ignore_index=-100))
        return torch.stack(losses).mean()


class DistillHeads(torch.nn.Module):
    """Linear maps from the vision tower's final states to the teacher's targets (training-time only): patch
    tokens -> the teacher's feature map on the patch grid, pooled CLS state -> its pooled features."""

    def __init__(self, width: int, dense_dim: int, pooled_dim: int):
        super().__init__()
        self.dense = torch.nn.Linear(width, dense_dim)
        self.pooled = torch.nn.Linear(width, pooled_dim)

    def forward(self, states: torch.Tensor, dense: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """states [N, 1 + tokens, width] (post-layernorm, CLS first); dense [N, tokens, C]; pooled [N, D]."""
        return (F.mse_loss(self.dense(states[:, 1:]), dense) + F.mse_loss(self.pooled(states[:, 0]), pooled)) / 2
