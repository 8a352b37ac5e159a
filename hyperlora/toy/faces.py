"""The toy world's face analysis (antelopev2's role): train the detector and the recogniser, check the gates.

    python -m hyperlora.toy.faces --out /tmp/faces --smoke                  # plumbing, seconds
    python -m hyperlora.toy.faces --out data/toy/faces --detector.steps 3000

A model folder holds detector.onnx, recognizer.onnx (insightface loads it as an ArcFaceONNX), their
torch checkpoints and training records (*_train.json: config, command, commit, seconds), and after
`evaluate_faces` the model card (model_card.json, README.md) and cosine_distributions.png.

The gates (issue 3): detection >= 99 % on held-out renders; verification on the test identities
with accuracy >= 97 % or TAR >= 95 % at FAR 1 %. The accuracy uses the threshold that is best on
the val identities, so the test split never tunes anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .cards import config_dict, git_commit, read_model_card, write_model_card
from .face_backend import DETECTOR_FILE, RECOGNIZER_FILE, require_file
from .face_detector import (
    DegradeConfig, DetectorTrainConfig, FaceDetector, degrade, export_detector, faceless, fit_detector,
)
from .face_recognizer import RecognizerTrainConfig, bgr, embed_crops, export_recognizer, fit_recognizer, load_recognizer
from .render import Render, render_sample, split_identities

PLOT_FILE = "cosine_distributions.png"
GATES = {"detection_rate": 0.99, "verification_accuracy": 0.97, "tar_at_far": 0.95}


@dataclass
class FaceEvalConfig:
    """How `evaluate_faces` measures the gates; a fixed seed makes evaluations identical run to run."""

    identities: int = 200  # held-out identities per split (val picks the threshold, test is reported)
    images_per_identity: int = 4  # renders per identity: 6 genuine pairs each
    seed: int = 20250611  # seed of the evaluation renders (train renders use the trainers' seeds)
    det_threshold: float = 0.5  # detector score that counts as a face
    iou: float = 0.5  # a detection is correct when its box overlaps the true one this much
    far: float = 0.01  # false accept rate for the TAR figure
    # the stand-in for generated images: every test image blurred and noised, half of them JPEG-compressed
    degrade: DegradeConfig = field(default_factory=lambda: DegradeConfig(colour=0.15, blur_prob=1.0, noise_prob=1.0,
                                                                         max_noise=6.0, jpeg_prob=0.5))  # fmt: skip

    def __post_init__(self):
        if isinstance(self.degrade, dict):
            self.degrade = DegradeConfig(**self.degrade)


@dataclass
class FaceTrainConfig:
    """Everything `build_faces` needs: one config per stage."""

    detector: DetectorTrainConfig = field(default_factory=DetectorTrainConfig)
    recognizer: RecognizerTrainConfig = field(default_factory=RecognizerTrainConfig)
    evaluation: FaceEvalConfig = field(default_factory=FaceEvalConfig)

    def __post_init__(self):
        for name, kind in (("detector", DetectorTrainConfig), ("recognizer", RecognizerTrainConfig),
                           ("evaluation", FaceEvalConfig)):  # fmt: skip
            if isinstance(getattr(self, name), dict):
                setattr(self, name, kind(**getattr(self, name)))

    @classmethod
    def smoke(cls) -> FaceTrainConfig:
        """Tiny models, a handful of steps, a small evaluation: seconds, plumbing only."""
        return cls(DetectorTrainConfig.smoke(), RecognizerTrainConfig.smoke(), FaceEvalConfig(identities=4,
                                                                                               images_per_identity=2))


def _record(out_dir: Path, name: str, config, history: dict) -> dict:
    record = {"config": config_dict(config), "history": history, "command": [sys.executable, *sys.argv],
              "git_commit": git_commit(),
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    (out_dir / f"{name}_train.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _save_weights(model: torch.nn.Module, config, path: Path) -> None:
    """Weights as safetensors with the training config in the metadata: reloads with nothing else."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(config_dict(config))})


def load_weights(path: Path) -> tuple[dict, dict]:
    """(config dict, state dict) of a `_save_weights` file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"]), {k: f.get_tensor(k) for k in f.keys()}


def _train(name: str, fit, export, config, out_dir) -> dict:
    """Train, save <name>.safetensors (weights + config) and <name>.onnx, write <name>_train.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, history = fit(config)
    _save_weights(model, config, out_dir / f"{name}.safetensors")
    export(model, config, out_dir / f"{name}.onnx")
    return _record(out_dir, name, config, history)


def train_detector(config: DetectorTrainConfig, out_dir) -> dict:
    return _train("detector", fit_detector, export_detector, config, out_dir)


def train_recognizer(config: RecognizerTrainConfig, out_dir) -> dict:
    return _train("recognizer", fit_recognizer, export_recognizer, config, out_dir)


# ---------------------------------------------------------------------------------------------
# Evaluation


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    return float(inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter))


def detection_figures(detector: FaceDetector, renders, images, threshold: float, iou: float) -> dict:
    """Detection rate (score >= threshold and IoU >= iou), keypoint error in px and in eye distances."""
    found = detector.detect_batch(images)
    hit = np.array([d.score >= threshold and box_iou(d.box, np.array(r.box)) >= iou for d, r in zip(found, renders)])
    errors = np.array([np.linalg.norm(d.kps - r.keypoints, axis=1).mean() for d, r in zip(found, renders)])
    eyes = np.array([np.linalg.norm(r.keypoints[1] - r.keypoints[0]) for r in renders])
    return {"detection_rate": float(hit.mean()), "kps_error_px": float(errors[hit].mean()) if hit.any() else None,
            "kps_error_eye_distances": float((errors / eyes)[hit].mean()) if hit.any() else None,
            "mean_score": float(np.mean([d.score for d in found]))}  # fmt: skip


def pair_scores(embeddings: np.ndarray, identities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities of all genuine (same identity) and all impostor pairs."""
    sims = embeddings @ embeddings.T
    upper = np.triu(np.ones_like(sims, dtype=bool), k=1)
    same = identities[:, None] == identities[None, :]
    return sims[upper & same], sims[upper & ~same]


def best_threshold(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy, (TAR + TRR) / 2."""
    candidates = np.unique(np.concatenate([genuine, impostor]))
    tar = 1 - np.searchsorted(np.sort(genuine), candidates, side="left") / len(genuine)
    trr = np.searchsorted(np.sort(impostor), candidates, side="left") / len(impostor)
    return float(candidates[np.argmax(tar + trr)])


def verification_figures(genuine: np.ndarray, impostor: np.ndarray, threshold: float, far: float) -> dict:
    """Balanced accuracy at `threshold` (chosen elsewhere), the best one here, and TAR at the given FAR."""
    at_far = float(np.quantile(impostor, 1 - far))
    best = best_threshold(genuine, impostor)

    def accuracy(t):
        return float(((genuine >= t).mean() + (impostor < t).mean()) / 2)

    return {"verification_accuracy": accuracy(threshold), "threshold": threshold, "best_accuracy": accuracy(best),
            "tar_at_far": float((genuine > at_far).mean()), "far": far, "genuine_pairs": len(genuine),
            "impostor_pairs": len(impostor), "genuine_mean": float(genuine.mean()),
            "impostor_mean": float(impostor.mean())}  # fmt: skip


def held_out_renders(split: str, config: FaceEvalConfig) -> list[Render]:
    """The evaluation renders of a held-out split (64 px, the evaluation seed)."""
    ids = split_identities(split)[: config.identities]
    return [render_sample(i, k, config.seed, 64) for i in ids for k in range(config.images_per_identity)]


def embed_images(detector: FaceDetector, recognizer, images: list[np.ndarray], kps=None) -> np.ndarray:
    """Normalised embeddings of RGB images, aligned with norm_crop on the detected keypoints (or on `kps`)."""
    from insightface.utils.face_align import norm_crop

    kps = [d.kps for d in detector.detect_batch(images)] if kps is None else kps
    return embed_crops(recognizer, [norm_crop(bgr(image), points) for image, points in zip(images, kps)])


def evaluate_faces(model_dir, config: FaceEvalConfig | None = None, *, write_card: bool = True) -> dict:
    """Measure the gates on held-out renders; write model_card.json, README.md and the cosine plot into model_dir."""
    config = config or FaceEvalConfig()
    model_dir = Path(model_dir)
    detector = FaceDetector(require_file(model_dir, DETECTOR_FILE), threshold=config.det_threshold)
    recognizer = load_recognizer(require_file(model_dir, RECOGNIZER_FILE))
    start = time.perf_counter()
    val = held_out_renders("val", config)
    val_embeddings = embed_images(detector, recognizer, [r.image for r in val])
    threshold = best_threshold(*pair_scores(val_embeddings, np.array([r.identity for r in val])))
    renders = held_out_renders("test", config)
    images, ids = [r.image for r in renders], np.array([r.identity for r in renders])
    rng = np.random.default_rng([config.seed, 7])
    degraded = [degrade(image, rng, config.degrade) for image in images]  # what generated images look like

    detection = detection_figures(detector, renders, images, config.det_threshold, config.iou)
    detection["degraded"] = detection_figures(detector, renders, degraded, config.det_threshold, config.iou)
    large = [render_sample(r.identity, k % config.images_per_identity, config.seed, 128) for k, r in enumerate(renders)]
    detection["at_128px"] = detection_figures(detector, large, [r.image for r in large], config.det_threshold,
                                              config.iou)
    negatives = detector.detect_batch([faceless(r) for r in renders])
    detection["false_positive_rate"] = float(np.mean([d.score >= config.det_threshold for d in negatives]))

    genuine, impostor = pair_scores(embed_images(detector, recognizer, images), ids)
    verification = verification_figures(genuine, impostor, threshold, config.far)
    true_kps = embed_images(detector, recognizer, images, [r.keypoints for r in renders])
    verification["with_true_kps"] = verification_figures(*pair_scores(true_kps, ids), threshold, config.far)
    verification["degraded"] = verification_figures(*pair_scores(embed_images(detector, recognizer, degraded), ids),
                                                    threshold, config.far)
    figures = {"detection": detection, "verification": verification, "images": len(renders),
               "eval_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
    gates = {"detection_rate >= 0.99": detection["detection_rate"] >= GATES["detection_rate"],
             "verification_accuracy >= 0.97 or TAR@FAR1% >= 0.95":
                 verification["verification_accuracy"] >= GATES["verification_accuracy"]
                 or verification["tar_at_far"] >= GATES["tar_at_far"]}  # fmt: skip
    plot_cosines(genuine, impostor, threshold, model_dir / PLOT_FILE)
    if write_card:
        _write_card(model_dir, config, figures, gates)
    return {"figures": figures, "gates": gates, "passed": all(gates.values())}


def plot_cosines(genuine: np.ndarray, impostor: np.ndarray, threshold: float, path=None):
    """Histograms of genuine and impostor cosine similarities with the decision threshold; saved to `path`
    (and closed) if given, else returned for a notebook to show."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(-1, 1, 81)
    ax.hist(impostor, bins, density=True, alpha=0.6, label=f"different identity ({len(impostor)} pairs)")
    ax.hist(genuine, bins, density=True, alpha=0.6, label=f"same identity ({len(genuine)} pairs)")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f} (from val)")
    ax.set(xlabel="cosine similarity", ylabel="density", title="toy recognizer on test identities")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _write_card(model_dir: Path, config: FaceEvalConfig, figures: dict, gates: dict) -> None:
    records = {name: json.loads(p.read_text()) for name in ("detector", "recognizer")
               if (p := model_dir / f"{name}_train.json").is_file()}  # fmt: skip
    files = {name: {"bytes": (model_dir / name).stat().st_size} for name in (DETECTOR_FILE, RECOGNIZER_FILE)}
    write_model_card(
        model_dir, name="toy face analysis", config={**{k: r["config"] for k, r in records.items()},
                                                     "evaluation": config_dict(config)},
        summary="Face detector (box, 5 keypoints, score) and ArcFace-style recognizer for the toy world, in "
                "antelopev2's role. ONNX, onnxruntime; recognizer.onnx loads with insightface.model_zoo.get_model "
                "and takes BGR norm_crop crops (insightface swaps them to RGB).",
        train_seconds=sum(r["history"]["train_seconds"] for r in records.values()), figures=figures, gates=gates,
        command=next((r["command"] for r in records.values()), None),
        extra={"files": files, "train_history": {k: r["history"] for k, r in records.items()},
               "train_commands": {k: r["command"] for k, r in records.items()}},
    )  # fmt: skip


def build_faces(config: FaceTrainConfig, out_dir, stages=("detector", "recognizer", "evaluate")) -> Path:
    """Train both models into out_dir and evaluate them (or only the named stages); returns the folder."""
    if "detector" in stages:
        train_detector(config.detector, out_dir)
    if "recognizer" in stages:
        train_recognizer(config.recognizer, out_dir)
    if "evaluate" in stages:
        evaluate_faces(out_dir, config.evaluation)
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    """Flags are the config fields: --detector.steps 3000, --recognizer.margin 0.3, --evaluation.identities 50."""
    parser = argparse.ArgumentParser(prog="python -m hyperlora.toy.faces", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="model folder")
    parser.add_argument("--smoke", action="store_true", help="start from the smoke preset")
    parser.add_argument("--stages", default="detector,recognizer,evaluate", help="comma-separated subset")
    for section in dataclasses.fields(FaceTrainConfig):
        for f in dataclasses.fields(section.default_factory()):
            parser.add_argument(f"--{section.name}.{f.name}", dest=f"{section.name}.{f.name}", type=json.loads,
                                help="a JSON value")  # fmt: skip
    args = vars(parser.parse_args(argv))
    config = FaceTrainConfig.smoke() if args.pop("smoke") else FaceTrainConfig()
    out, stages = args.pop("out"), tuple(args.pop("stages").split(","))
    for key, value in args.items():
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(config, section), name, value)
            getattr(config, section).__post_init__()  # dict -> DegradeConfig, list -> tuple
    folder = build_faces(config, out, stages)
    if "evaluate" in stages:
        card = read_model_card(folder)
        print(json.dumps({"figures": card["figures"], "gates": card["gates"], "passed": card["passed"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
