r"""Does the generated face follow the control while its identity follows the LoRA? (issue 19, notebook 09)

    python -m eval.controlnet --controlnet data/toy/controlnet --checkpoint runs/train/x/stage3/hyperlora \
        --out runs/eval/controlnet [--smoke]

Per held-out person (the first `num_people` of the 'test' split, as eval/protocol.py) the HyperLoRA makes a LoRA from
`num_references` renders and it is fused; then `seeds_per_person` images are generated with the ControlNet and,
with the same seeds, without it. Each seed's control is the pose map of a render of another person (the 'val'
split), so its pose is not the references'. The toy face analyzer finds the face in every image:
`metrics.keypoint_error` compares its keypoints with the control's (the images without the ControlNet are the
control group: how close an unsteered pose lands by chance; the analyzer on the control's own render is the ceiling,
`renders_ceiling`: its own keypoint error), `metrics.id_similarity` its embedding with the mean of
the person's references and, as the floor, with the next person's (a LoRA that carries no identity scores the same
on both). The identity figures are the HyperLoRA's; what the ControlNet may change is their difference with and
without it.

out gets summary.json (config, labels, both conditions' figures, one record per image) and control_grid.png
(per person: control map | without | with; the control's keypoints as white crosses, the detected ones as dots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from hyperlora.toy.identity import split_identities
from hyperlora.toy.render import render_sample

from . import metrics
from .protocol import eval_seed, git_commit
from .summary import json_default

FLOOR_MARGIN = 0.05  # ID similarity to the right person within this of the next person's: at the floor


@dataclass
class ControlEvalConfig:
    """One ControlNet measurement; saved in summary.json."""

    controlnet: str = "data/toy/controlnet"  # a ControlNetModel folder made from the pipeline's UNet
    checkpoint: str = ""  # HyperLoRA folder; "": a freshly initialised, UNTRAINED one, labelled so
    toy_dir: str = "data/toy"  # the toy pipeline (sdxl/), CLIP (clip/) and face models (faces/)
    num_people: int = 8  # held-out identities: the first n of the 'test' split
    seeds_per_person: int = 4  # images per person and condition, each with its own control and seed
    num_references: int = 2  # reference renders per person
    prompt: str = "a portrait of a person"  # the trigger words are put in front
    steps: int = 20  # DPM++ 2M Karras steps (the toy world's default)
    id_scale: float | None = None  # ID-LoRA weight; None: the checkpoint's measured one, else the release's 0.85
    conditioning_scale: float = 1.0  # controlnet_conditioning_scale
    pose_source: str = "other"  # whose renders the pose maps come from: "other" ('val' people: another face's
    # proportions too) or "own" (new renders of the person, looks after the references': only the pose differs)
    det_threshold: float = 0.5  # toy face detector score threshold
    seed: int = 0  # reference renders, controls and generators derive from it
    smoke: bool = False  # tiny sizes; the figures check plumbing only


SMOKE = {"num_people": 2, "seeds_per_person": 1, "num_references": 1, "steps": 2}


def _face(analyzer, image: np.ndarray):
    """The largest sure face of a uint8 image, or None."""
    from hyperlora.conditioning.faces import choose_face

    faces = analyzer.detect(Image.fromarray(image))
    return choose_face(faces, "largest", "generated image")[0] if faces else None


def _reference_embedding(analyzer, images: list[np.ndarray]) -> np.ndarray | None:
    """Unit mean of the references' face embeddings (None when no reference face is found)."""
    found = [f.embedding for f in (_face(analyzer, image) for image in images) if f is not None]
    if not found:
        return None
    mean = np.mean(found, 0)
    return mean / np.linalg.norm(mean)


def load_parts(config: ControlEvalConfig, out: Path):
    """(HyperLoRA pipeline, the same pipeline wrapped with the ControlNet, face analyzer, checkpoint folder)."""
    from diffusers import ControlNetModel

    from hyperlora.conditioning.backends import make_face_analyzer
    from hyperlora.pipeline import HyperLoRAPipeline, with_controlnet
    from hyperlora.toy.controlnet import check_matches
    from hyperlora.worlds.toy import write_untrained_checkpoint

    toy = Path(config.toy_dir)
    if not (Path(config.controlnet) / "config.json").is_file():
        raise FileNotFoundError(f"--controlnet {config.controlnet}: no ControlNetModel there (config.json + "
                                "*.safetensors); train one with `python -m hyperlora.toy train-controlnet --out DIR`")  # fmt: skip
    checkpoint = config.checkpoint or write_untrained_checkpoint(out / "untrained_hyperlora", seed=config.seed,
                                                                 pipeline=toy / "sdxl")  # fmt: skip
    pipe = HyperLoRAPipeline.from_pretrained("toy", checkpoint=checkpoint, pipeline=toy / "sdxl", clip=toy / "clip")
    controlnet = ControlNetModel.from_pretrained(config.controlnet, dtype=torch.float32)
    check_matches(controlnet, pipe.pipe.unet)
    controlled = with_controlnet(pipe.pipe, controlnet)  # shares the UNet: the fused LoRA steers both
    for p in (pipe.pipe, controlled):
        p.set_progress_bar_config(disable=True)
    analyzer = make_face_analyzer("toy", model_dir=toy / "faces", det_threshold=config.det_threshold)
    return pipe, controlled, analyzer, Path(checkpoint)


def measure_control(config: ControlEvalConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Run the measurement (module docstring); writes and returns the summary."""
    from hyperlora.toy.controlnet import pose_map

    if config.pose_source not in ("other", "own"):
        raise ValueError(f"pose_source must be 'other' or 'own', got {config.pose_source!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe, controlled, analyzer, checkpoint = load_parts(config, out)
    if config.id_scale is None:  # recorded as the number used
        config = dataclasses.replace(config, id_scale=pipe.id_weight)
    people = [int(i) for i in split_identities("test")[: config.num_people]]
    poses = split_identities("val")
    references = {i: [render_sample(i, k, config.seed).image for k in range(config.num_references)] for i in people}
    faces = {i: _reference_embedding(analyzer, images) for i, images in references.items()}
    sampling = {**pipe.defaults, "num_inference_steps": config.steps, "output_type": "np"}
    records, shown, ceiling = [], [], []
    bar = tqdm(total=len(people) * config.seeds_per_person, desc="ControlNet measurement", disable=not progress)
    for p, identity in enumerate(people):
        pipe.personalize(references[identity], id_scale=config.id_scale)
        for s in range(config.seeds_per_person):
            if config.pose_source == "own":  # a look the references do not have
                pose = render_sample(identity, config.num_references + s, config.seed)
            else:
                pose = render_sample(int(poses[(p * config.seeds_per_person + s) % len(poses)]), 0, config.seed)
            control = pose_map(pose.keypoints, pose.box, pose.image.shape[0])
            seed = eval_seed(config.seed, identity, s)
            images = {"without": pipe(config.prompt, generator=torch.Generator().manual_seed(seed), **sampling),
                      "with": controlled(pipe.prompt_as_sent(config.prompt), image=Image.fromarray(control),
                                         controlnet_conditioning_scale=config.conditioning_scale,
                                         generator=torch.Generator().manual_seed(seed), **sampling)}  # fmt: skip
            images = {k: (np.asarray(v.images[0]) * 255).round().astype(np.uint8) for k, v in images.items()}
            for condition, image in images.items():
                face = _face(analyzer, image)
                records.append({"person": identity, "next_person": people[(p + 1) % len(people)], "seed_index": s,
                                "seed": seed, "condition": condition, "pose_of": pose.identity,
                                "control_kps": pose.keypoints.tolist(), "detected": face is not None,
                                "kps": None if face is None else face.kps.tolist(),
                                "embedding": None if face is None else face.embedding})  # fmt: skip
            if s == 0:
                shown.append((identity, control, images, records[-2:], pose.keypoints))
            face = _face(analyzer, pose.image)  # the ceiling: the detector on the render the control came from
            ceiling.append((None if face is None else face.kps, pose.keypoints))
            bar.update()
    bar.close()
    pipe.reset()
    summary = summarize(records, faces, config, label=pipe.label, checkpoint=checkpoint)
    kp = metrics.keypoint_error(*zip(*ceiling))
    summary["renders_ceiling"] = {"keypoint_error_px": kp["error_px"], "keypoint_error_iod": kp["error_iod"],
                                  "detection_rate": kp["detection_rate"], "n": kp["n"]}  # fmt: skip
    plot_grid(shown, out / "control_grid.png", title=summary["label"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    return summary


def _condition(rows: list[dict], faces: dict) -> dict:
    """Keypoint error, detection rate and ID similarity (to the person and to the next one) of one condition."""
    kp = metrics.keypoint_error([r["kps"] for r in rows], [r["control_kps"] for r in rows])
    for r, px, iod in zip(rows, kp["per_image_px"], kp["per_image_iod"]):
        r["error_px"], r["error_iod"] = (None, None) if np.isnan(px) else (float(px), float(iod))
    figures = {"keypoint_error_px": kp["error_px"], "keypoint_error_iod": kp["error_iod"],
               "detection_rate": kp["detection_rate"], "n": kp["n"]}  # fmt: skip
    for key, whose in (("id_sim", "person"), ("id_sim_next_person", "next_person")):
        scored = [r for r in rows if faces[r[whose]] is not None]
        if not scored:
            figures[key] = None
            continue
        result = metrics.id_similarity(np.stack([faces[r[whose]] for r in scored]), [r["embedding"] for r in scored])
        figures[key] = result["id_sim"]
        for r, value in zip(scored, result["per_image"]):
            r[key] = float(value)
    return figures


def summarize(records: list[dict], faces: dict, config: ControlEvalConfig, *, label: str, checkpoint: Path) -> dict:
    """Both conditions' figures, the pose gain (control group minus ControlNet) and the labels."""
    conditions = {c: _condition([r for r in records if r["condition"] == c], faces) for c in ("without", "with")}
    with_, without = conditions["with"], conditions["without"]
    at_floor = {name: c["id_sim"] is not None and c["id_sim_next_person"] is not None
                and c["id_sim"] - c["id_sim_next_person"] < FLOOR_MARGIN for name, c in conditions.items()}  # fmt: skip
    floor = at_floor["without"]  # the HyperLoRA alone: does it carry identity at all?
    notes = []
    if floor:
        notes.append(f"ID similarity AT THE FLOOR (within {FLOOR_MARGIN} of the next person's references): this "
                     "HyperLoRA does not carry identity yet, so with vs without compares floors")  # fmt: skip
    elif at_floor["with"]:
        notes.append(f"identity above the floor without the ControlNet, AT THE FLOOR with it (within {FLOOR_MARGIN} "
                     "of the next person's references): the control costs the identity")  # fmt: skip
    if config.smoke:
        notes.append("smoke size: plumbing only")
    card = Path(config.controlnet) / "model_card.json"
    trained = json.loads(card.read_text())["config"].get("steps") if card.is_file() else None
    for r in records:
        r.pop("embedding")
    return {
        "label": "; ".join([label, f"ControlNet {config.controlnet} ({trained} training steps)", *notes]),
        "identity_at_floor": bool(floor),
        "identity_at_floor_with_controlnet": bool(at_floor["with"]),
        "config": dataclasses.asdict(config),
        "checkpoint": str(checkpoint),
        "command": [sys.executable, *sys.argv],
        "git_commit": git_commit(),
        "without_controlnet": without,
        "with_controlnet": with_,
        "keypoint_error_iod_gain": _difference(without["keypoint_error_iod"], with_["keypoint_error_iod"]),
        "id_sim_change": _difference(with_["id_sim"], without["id_sim"]),
        "records": records,
    }


def _difference(a, b):
    return None if a is None or b is None or np.isnan(a) or np.isnan(b) else float(a - b)


def plot_grid(shown: list, path: Path, *, title: str = "") -> Path:
    """Per person one row: control map | without the ControlNet | with it; crosses: the control's keypoints,
    dots: the detected face's, each titled with its keypoint error (inter-ocular distances)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hyperlora.toy.controlnet import KEYPOINT_COLOURS

    fig, axes = plt.subplots(len(shown), 3, figsize=(6, 2.1 * len(shown) + 0.6), squeeze=False, layout="constrained")
    for row, (identity, control, images, rows, target) in zip(axes, shown):
        row[0].imshow(control)
        row[0].set_title(f"person {identity}: a pose of {rows[0]['pose_of']}", fontsize=7)
        for ax, (name, image), record in zip(row[1:], images.items(), rows):
            ax.imshow(image)
            ax.scatter(target[:, 0], target[:, 1], marker="x", c="white", s=18, linewidths=1)
            if record["kps"] is not None:
                kps = np.asarray(record["kps"])
                ax.scatter(kps[:, 0], kps[:, 1], c=KEYPOINT_COLOURS, s=10, edgecolors="black", linewidths=0.4)
                error = record.get("error_iod")
                ax.set_title(f"{name} ControlNet: {error:.2f} IOD" if error is not None else name, fontsize=7)
            else:
                ax.set_title(f"{name} ControlNet: no face", fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.suptitle(title, fontsize=6, wrap=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.controlnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    for field in dataclasses.fields(ControlEvalConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            parser.add_argument(flag, dest=field.name, action="store_true", default=None)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(field.type, str)
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=f"default: {field.default!r}")
    args = parser.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ControlEvalConfig)
             if getattr(args, f.name) is not None}  # fmt: skip
    config = ControlEvalConfig(**{**(SMOKE if given.get("smoke") else {}), **given})
    summary = measure_control(config, args.out)
    print(summary["label"])
    for name in ("without_controlnet", "with_controlnet"):
        print(name, json.dumps(summary[name]))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
