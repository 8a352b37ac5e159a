"""Diagnostics that say where a toy model's gate is lost: the pixels, the model, or the measurement.

- `attribute_ceiling`: a small supervised CNN trained on the same 64 x 64 renders as the toy CLIP. Its
  per-attribute accuracy on 'val' renders is what the pixels allow; a gap between it and CLIP's zero-shot
  figures is the CLIP's, not the resolution's.
- `clip_linear_probe`: a linear classifier per attribute on the toy CLIP's pooled vision features: what
  the image tower has learned, whatever the text side makes of it.
- `shared_look_identity_level`: how alike the toy ArcFace finds different people who share one look, the
  fair reference for the base model's same-prompt identity similarity.
- `vae_identity_breakdown`: splits the VAE's identity loss into content (both crops aligned on the
  original's keypoints) and alignment (the detector's keypoints moving on the reconstruction).

- `trigger_word_damage`: the base model's prompt adherence with HyperLoRA's trigger words against without.

`python -m hyperlora.toy diagnose {ceiling,probe,vae,looks,trigger}` prints each as JSON. These are measurements for
decisions and closing notes, not gates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cards import config_dict
from .clip import EVAL_SEED as CLIP_SEED
from .data import split_renders, to_tensor, to_uint8
from .identity import LOOK_ATTRIBUTES
from .teacher import attribute_accuracy, attribute_labels, evaluate_attribute_cnn, fit_attribute_cnn
from .vae import EVAL_SEED as VAE_SEED
from .vae import reconstruct


@dataclass
class CeilingConfig:
    """The supervised CNN of `attribute_ceiling` (defaults: ~13 min on one thread)."""

    num_train: int = 2000  # training identities (the first of the toy CLIP's 5,000)
    images_per_identity: int = 4
    val_identities: int | None = None  # None: all 'val' identities
    val_per_identity: int = 2
    widths: tuple[int, ...] = (32, 64, 96, 128)  # one conv block (2 convs, BN, ReLU, 2x pool) per width
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3  # one-cycle peak
    seed: int = 0
    threads: int = 1


def attribute_ceiling(config: CeilingConfig | None = None) -> dict:
    """Per-attribute 'val' accuracy of a small CNN trained with labels on the toy CLIP's training renders."""
    config = config or CeilingConfig()
    torch.set_num_threads(config.threads)
    train = split_renders("train", config.num_train, config.images_per_identity, 0)
    val = split_renders("val", config.val_identities, config.val_per_identity, CLIP_SEED)
    start = time.time()
    model = fit_attribute_cnn(to_tensor(train["images"]), attribute_labels(train), widths=config.widths,
                              steps=config.steps, batch_size=config.batch_size, lr=config.lr, seed=config.seed)
    seconds = time.time() - start
    result = evaluate_attribute_cnn(model, to_tensor(val["images"]), attribute_labels(val))
    return {**result, "train_seconds": seconds, "n_val": len(val["images"]), "config": config_dict(config)}


def clip_linear_probe(clip_path: str | Path, *, num_train: int = 600, steps: int = 300, threads: int = 1) -> dict:
    """Per-attribute 'val' accuracy of linear classifiers on the toy CLIP's pooled vision features
    (post-layernorm CLS state), fitted on `num_train` training identities x 2 renders."""
    from transformers import CLIPModel

    from .clip import pixel_values

    torch.set_num_threads(threads)
    model = CLIPModel.from_pretrained(clip_path, dtype=torch.float32).eval()

    @torch.no_grad()
    def features(arrays: dict) -> torch.Tensor:
        pixels = pixel_values(arrays["images"])
        return torch.cat([model.vision_model(pixel_values=pixels[i : i + 256]).pooler_output
                          for i in range(0, len(pixels), 256)])  # fmt: skip

    train, val = split_renders("train", num_train, 2, 7), split_renders("val", None, 2, CLIP_SEED)
    f_train, f_val = features(train), features(val)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_val = (f_train - mean) / std, (f_val - mean) / std
    y_train, logits = attribute_labels(train), []
    torch.manual_seed(0)
    for j, values in enumerate(LOOK_ATTRIBUTES.values()):
        probe = nn.Linear(f_train.shape[1], len(values))
        optimizer = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-4)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(probe(f_train), y_train[:, j], ignore_index=-100).backward()
            optimizer.step()
        logits.append(probe(f_val).detach())
    accuracy = attribute_accuracy(logits, attribute_labels(val))
    return {"accuracy": accuracy, "mean": float(np.mean(list(accuracy.values()))), "n_val": len(val["images"])}


def vae_identity_breakdown(vae_path: str | Path, faces_path: str | Path, *, per_identity: int = 2) -> dict:
    """Toy-ArcFace cosine between 'test' renders and their VAE reconstructions, aligned three ways."""
    from diffusers import AutoencoderKL

    from .face_backend import DETECTOR_FILE, RECOGNIZER_FILE, require_file
    from .face_detector import FaceDetector
    from .face_recognizer import load_recognizer
    from .faces import embed_images

    vae = AutoencoderKL.from_pretrained(vae_path, dtype=torch.float32).eval()
    arrays = split_renders("test", None, per_identity, VAE_SEED)
    originals, reconstructions = list(arrays["images"]), list(to_uint8(reconstruct(vae, to_tensor(arrays["images"]))))
    detector = FaceDetector(require_file(faces_path, DETECTOR_FILE))
    recognizer = load_recognizer(require_file(faces_path, RECOGNIZER_FILE))
    kps_original = [d.kps for d in detector.detect_batch(originals)]
    kps_recon = [d.kps for d in detector.detect_batch(reconstructions)]

    def cosine(images_a, kps_a, images_b, kps_b) -> float:
        a, b = embed_images(detector, recognizer, images_a, kps_a), embed_images(detector, recognizer, images_b, kps_b)
        return float((a * b).sum(1).mean())

    return {
        "each_own_detection": cosine(originals, kps_original, reconstructions, kps_recon),  # the VAE gate's figure
        "shared_alignment": cosine(originals, kps_original, reconstructions, kps_original),  # content only
        "alignment_only": cosine(originals, kps_original, originals, kps_recon),  # the original, moved crops
        "keypoint_shift_px": float(np.mean([np.abs(a - b).mean() for a, b in zip(kps_original, kps_recon)])),
        "n_images": len(originals),
    }


def shared_look_identity_level(faces_path: str | Path, *, num_looks: int = 32, per_look: int = 4) -> dict:
    """Toy-ArcFace cosine between renders of different 'test' identities that share one look: the level the base
    model's same-prompt identity similarity should reach if its people are as different as real ones (the
    looks are the base model's evaluation prompts' looks, `pipeline.prompt_looks`)."""
    from itertools import combinations

    from .pipeline import face_judges, prompt_looks
    from .render import render, split_identities

    _, embed = face_judges(faces_path)
    identities, similarities = split_identities("test"), []
    for j, look in enumerate(prompt_looks(num_looks, 0)):
        people = [identities[(per_look * j + k) % len(identities)] for k in range(per_look)]
        embeddings = embed(np.stack([render(person, look).image for person in people]))
        found = [e for e in embeddings if not torch.isnan(e).any()]  # NaN rows: no face found
        similarities += [float(a @ b) for a, b in combinations(found, 2)]
    return {"shared_look_different_identity_mean": float(np.mean(similarities)), "n_pairs": len(similarities)}



def trigger_word_damage(toy_dir: str | Path, words: str = "fcsks fxhks fhyks", *, num_prompts: int = 32,
                        per_prompt: int = 2) -> dict:  # fmt: skip
    """The base model's prompt adherence with HyperLoRA's trigger words before every prompt (a zero LoRA) against
    without: SDXL's text encoders have seen such rare tokens, the toy ones may not have, and the ID-LoRA's
    case (b) assumes that the words alone change nothing. Same prompts and seeds in both."""
    from .pipeline import clip_judge, evaluate_base_model, face_judges, load_toy_pipeline

    toy_dir = Path(toy_dir)
    pipe, judge = load_toy_pipeline(toy_dir / "sdxl"), clip_judge(toy_dir / "clip")
    detect, _ = face_judges(toy_dir / "faces")
    out = {}
    for name, prefix in (("plain", ""), ("trigger_words", words)):
        figures = evaluate_base_model(pipe, judge=judge, detector=detect, num_prompts=num_prompts,
                                      per_prompt=per_prompt, prompt_prefix=prefix)  # fmt: skip
        out[name] = {k: figures[k] for k in ("attribute_accuracy", "per_attribute_accuracy", "face_rate")}
    out["adherence_ratio"] = out["trigger_words"]["attribute_accuracy"] / out["plain"]["attribute_accuracy"]
    out["words"], out["num_images"] = words, num_prompts * per_prompt
    return out
