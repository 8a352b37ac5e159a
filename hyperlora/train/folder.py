"""The sdxl world's folder dataset: a folder of captioned photos -> a prepared `TrainingSet`, once.

    DIR/images/*          the photos (jpg, png, webp, ...)
    DIR/captions.jsonl    one JSON object a line: {"file": "images/x.jpg", "caption": "...", "person": "optional id"}

Photos with the same person id are "other" references of each other; a photo without one is its own person.
Each photo is loaded robustly, its face analysed and CLIP-encoded once on the ORIGINAL photo (the masked
face crop, the face-blurred Base image, and the same of an augmented copy: the "self" reference), then
resized and centre-cropped to SDXL's aspect-ratio bucket nearest its shape, with SDXL's time ids (original
size, crop corner, target size) recorded from that crop; the crop goes through the VAE, the caption through
both text encoders. A photo that fails (unreadable, no face, face too small, no caption) is left out and
listed with its reason in `prepare_report.json`.

`python -m hyperlora.train prepare --src DIR --out DIR --pipeline SDXL --clip CLIP --face-backend dlib`
writes OUT/training_set.safetensors (and OUT/val/ with --val-fraction: held-out persons) for `--data OUT`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..conditioning.backends import FACE_BACKENDS, make_face_analyzer
from ..conditioning.clip_features import ClipImageEncoder
from ..conditioning.faces import DEFAULT_MIN_FACE_SIZE
from ..conditioning.images import ConditioningError, load_image
from ..conditioning.references import Conditioner
from ..config import HyperLoRAConfig
from .data import TRAINING_SET_FILE, TrainingSet, augment, encode_latents_and_text

CAPTIONS_FILE = "captions.jsonl"
REPORT_FILE = "prepare_report.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# SDXL's aspect-ratio buckets (height, width) at about 1024^2 pixels; scaled to a pipeline's own default size.
SDXL_BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (1536, 640), (640, 1536))  # fmt: skip


@dataclass
class Entry:
    """One line of captions.jsonl (or a photo no line names: caption None)."""

    file: str  # relative to the folder, e.g. "images/x.jpg"
    caption: str | None
    person: str  # the person id; a photo without one is its own person (its file name)
    line: int | None  # 1-based line in captions.jsonl


@dataclass
class Photo:
    """A prepared photo: which bucket, SDXL's time ids, and every per-image row of the TrainingSet."""

    entry: Entry
    bucket: int  # index into the bucket list
    time_ids: list[int]  # original (h, w) as loaded (long side <= 2048), crop top-left (top, left), target (h, w)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # TrainingSet field -> this photo's row


def read_captions(src: str | Path) -> list[Entry]:
    """captions.jsonl's entries in order, then photos under images/ that no line names (to be reported)."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"--src {src}: no such folder")
    path = src / CAPTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the folder needs {CAPTIONS_FILE} with one line per photo: "
                                '{"file": "images/x.jpg", "caption": "...", "person": "optional id"}')  # fmt: skip
    entries, seen = [], {}
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number}: not JSON ({err.msg})") from None
        if not isinstance(value, dict) or not isinstance(value.get("file"), str) or not value["file"]:
            raise ValueError(f'{path} line {number}: expected an object with a "file" string, got {text.strip()[:80]}')
        file = Path(value["file"]).as_posix()
        if file in seen:
            raise ValueError(f"{path} line {number}: {file} is already listed on line {seen[file]}")
        seen[file] = number
        caption = value.get("caption")
        person = value.get("person")
        entries.append(Entry(file, caption.strip() if isinstance(caption, str) else None,
                             str(person) if person not in (None, "") else file, number))  # fmt: skip
    images = src / "images"
    unlisted = sorted(p.relative_to(src).as_posix() for p in images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return entries + [Entry(file, None, file, None) for file in unlisted if file not in seen]


def scaled_buckets(pipe, buckets=SDXL_BUCKETS) -> list[tuple[int, int]]:
    """SDXL's buckets scaled from 1024 to the pipeline's default size, sides rounded to what the VAE and UNet divide."""
    size = pipe.default_sample_size * pipe.vae_scale_factor
    multiple = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    scaled = []
    for h, w in buckets:
        side = tuple(max(multiple, round(s * size / 1024 / multiple) * multiple) for s in (h, w))
        if side not in scaled:
            scaled.append(side)
    return scaled


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is nearest (in log ratio) to an image of `size` = (width, height)."""
    ratio = math.log(size[1] / size[0])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


def resize_crop(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, list[int]]:
    """Resize to cover `target` (height, width) and centre-crop; returns the crop and SDXL's six time ids."""
    (th, tw), (w, h) = target, image.size
    scale = max(th / h, tw / w)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    top, left = (rh - th) // 2, (rw - tw) // 2
    crop = image.resize((rw, rh), Image.Resampling.LANCZOS).crop((left, top, left + tw, top + th))
    return crop, [h, w, top, left, th, tw]


def box_in_crop(box, size: tuple[int, int], time_ids: list[int]) -> torch.Tensor:
    """A face box x1, y1, x2, y2 in the photo's pixels -> fractions of `resize_crop`'s crop (time ids h, w, top,
    left, th, tw), clipped to it."""
    (w, h), (_, _, top, left, th, tw) = size, time_ids
    scale = max(th / h, tw / w)
    x1, y1, x2, y2 = box
    out = torch.tensor([(x1 * scale - left) / tw, (y1 * scale - top) / th, (x2 * scale - left) / tw,
                        (y2 * scale - top) / th], dtype=torch.float32)  # fmt: skip
    return out.clamp(0, 1)


def _reason(err: Exception, name: str) -> str:
    """The error's message without the leading "name: " the conditioning errors start with."""
    text = str(err)
    return text[len(name) + 2 :] if text.startswith(name + ": ") else text


@torch.no_grad()
def _prepare_photo(entry: Entry, src: Path, pipe, conditioner: Conditioner, buckets: list[tuple[int, int]],
                   trigger_words: str, seed: int) -> tuple[Photo, list[str]]:  # fmt: skip
    """One photo -> its Photo and warnings; raises ConditioningError whose message is the reason to skip it."""
    path = src / entry.file
    try:
        image = load_image(path)
    except ConditioningError as err:
        raise ConditioningError(_reason(err, str(path))) from None
    try:
        crop, embedding, base, warnings, _, box = conditioner.prepare(image, entry.file)
    except ConditioningError as err:
        raise ConditioningError(_reason(err, entry.file)) from None
    rng = np.random.default_rng([seed, zlib.crc32(entry.file.encode())])  # per photo, whatever else is skipped
    try:  # the "self" reference: the same photo flipped, shifted and scaled (as encode_images does)
        crop_aug, embedding_aug, *_ = conditioner.prepare(augment(image, rng), "augmented copy")
    except ConditioningError as err:
        raise ConditioningError(f"augmented copy ('self' reference): {_reason(err, 'augmented copy')}") from None
    clip = conditioner.clip([crop, crop_aug, base]).float().cpu()
    bucket = nearest_bucket(image.size, buckets)
    target, time_ids = resize_crop(image, buckets[bucket])
    encoded = encode_latents_and_text(pipe, [target], [entry.caption], trigger_words)
    rows = {key: value[0] for key, value in encoded.items()}
    rows |= {"clip_id": clip[0].half(), "clip_id_aug": clip[1].half(), "clip_base": clip[2].half(),
             "arcface": torch.from_numpy(np.asarray(embedding, np.float32)),
             "arcface_aug": torch.from_numpy(np.asarray(embedding_aug, np.float32)),
             "face_box": box_in_crop(box, image.size, time_ids)}  # fmt: skip
    return Photo(entry, bucket, time_ids, rows), warnings


def assemble(photos: list[Photo], persons: dict[str, int], empty: tuple[torch.Tensor, torch.Tensor],
             scaling_factor: float) -> tuple[TrainingSet, list[int]]:  # fmt: skip
    """Photos -> one TrainingSet whose buckets are those the photos use; returns it and their bucket indices."""
    used = sorted({p.bucket for p in photos})
    bucket = torch.tensor([used.index(p.bucket) for p in photos], dtype=torch.long)
    row = torch.zeros(len(photos), dtype=torch.long)
    for b in range(len(used)):
        members = (bucket == b).nonzero().squeeze(1)
        row[members] = torch.arange(len(members))
    latents = {key: [torch.stack([p.rows[key] for p in photos if p.bucket == u]) for u in used]
               for key in ("latent_mean", "latent_std")}  # fmt: skip
    per_image = {key: torch.stack([p.rows[key] for p in photos]) for key in photos[0].rows
                 if not key.startswith("latent")}  # fmt: skip
    data = TrainingSet(
        **latents, bucket=bucket, row=row, person=torch.tensor([persons[p.entry.person] for p in photos]),
        time_ids=torch.tensor([p.time_ids for p in photos], dtype=torch.float32),
        empty_embeds=empty[0], empty_pooled=empty[1], valid=torch.ones(len(photos), dtype=torch.bool),
        scaling_factor=scaling_factor, **per_image,
    )  # fmt: skip
    return data, used


def split_persons(photos: list[Photo], val_fraction: float, seed: int) -> tuple[list[Photo], list[Photo]]:
    """Hold out round(val_fraction x persons) persons (at least one), drawn with `seed`; every photo of a person
    stays on one side."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return photos, []
    names = sorted({p.entry.person for p in photos})
    count = max(1, round(val_fraction * len(names)))
    if count >= len(names):
        raise ValueError(f"--val-fraction {val_fraction} holds out {count} of {len(names)} usable persons: "
                         "none left to train on")
    held = {names[i] for i in np.random.default_rng(seed).permutation(len(names))[:count]}
    return [p for p in photos if p.entry.person not in held], [p for p in photos if p.entry.person in held]


def prepare_folder(src: str | Path, out: str | Path, *, pipeline: str | Path, clip: str | Path, face_backend: str,
                   face_kwargs: dict | None = None, trigger_words: str = HyperLoRAConfig.trigger_words,
                   buckets=SDXL_BUCKETS, max_images: int | None = None, val_fraction: float = 0.0, seed: int = 0,
                   min_face_size: float = DEFAULT_MIN_FACE_SIZE, device: str = "cpu",
                   progress: bool = True) -> Path:  # fmt: skip
    """A captioned photo folder -> `out/` holding training_set.safetensors (and val/) and prepare_report.json."""
    from .loop import load_base_pipeline

    if max_images is not None and max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {max_images}")
    src, out = Path(src), Path(out)
    entries = read_captions(src)[:max_images]
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} already exists and is not empty; choose another folder or delete it")
    pipe = load_base_pipeline(str(pipeline), "sdxl").to(device)
    analyzer = make_face_analyzer(face_backend, **(face_kwargs or {}))
    conditioner = Conditioner(analyzer, ClipImageEncoder(clip, device=device), with_base=True,
                              min_face_size=min_face_size)  # fmt: skip
    sizes = scaled_buckets(pipe, buckets)
    photos, status = [], []
    for entry in tqdm(entries, desc="preparing photos", disable=not progress, mininterval=5):
        record = {"file": entry.file, "person": entry.person, "line": entry.line}
        try:
            if not entry.caption:
                raise ConditioningError("missing caption" + ("" if entry.line else f" (no line in {CAPTIONS_FILE})"))
            photo, warnings = _prepare_photo(entry, src, pipe, conditioner, sizes, trigger_words, seed)
        except ConditioningError as err:
            status.append(record | {"status": "skipped", "reason": str(err)})
            continue
        photos.append(photo)
        status.append(record | {"status": "ok", "bucket": list(sizes[photo.bucket]), "time_ids": photo.time_ids,
                                "warnings": [_reason(w, entry.file) for w in warnings]})  # fmt: skip
    skipped = [{"file": s["file"], "reason": s["reason"]} for s in status if s["status"] == "skipped"]
    if not photos:
        reasons = "\n".join(f"  {s['file']}: {s['reason']}" for s in skipped)
        raise ValueError(f"{src}: none of the {len(entries)} photos is usable:\n{reasons}")
    train, val = split_persons(photos, val_fraction, seed)
    persons = {name: i for i, name in enumerate(dict.fromkeys(p.entry.person for p in photos))}
    with torch.no_grad():
        empty, _, empty_pooled, _ = pipe.encode_prompt("", device=pipe.vae.device, do_classifier_free_guidance=False)
    empty = (empty.half().cpu(), empty_pooled.half().cpu())
    scaling = float(pipe.vae.config.scaling_factor)
    parts = {name: assemble(part, persons, empty, scaling) for name, part in (("", train), ("val", val)) if part}
    meta = {"source": str(src.resolve()), "pipeline": str(pipeline), "clip": str(clip), "face_backend": face_backend,
            "trigger_words": trigger_words, "seed": seed, "all_buckets": [list(s) for s in sizes], "photos": status}
    in_bucket = Counter(p.bucket for p in photos)
    counts = {"photos": len(entries), "used": len(photos), "skipped": len(skipped), "persons": len(persons),
              "train_photos": len(train), "val_photos": len(val),
              "buckets": {f"{h}x{w}": in_bucket[i] for i, (h, w) in enumerate(sizes) if in_bucket[i]}}  # fmt: skip
    report = {"source": meta["source"], "counts": counts, "skipped": skipped, "photos": status}
    _write(out, parts, {"": train, "val": val}, meta, sizes, report)
    if progress:
        print(summary(report, out))
    return out


def _write(out: Path, parts: dict, photos: dict[str, list[Photo]], meta: dict, sizes: list, report: dict) -> None:
    """Every file into a temporary folder beside `out`, then moved into place: a failure leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, (data, used) in parts.items():
            (tmp / name).mkdir(exist_ok=True)
            rows = [{"file": p.entry.file, "person": p.entry.person, "caption": p.entry.caption} for p in photos[name]]
            data.save(tmp / name / TRAINING_SET_FILE, meta | {"buckets": [list(sizes[u]) for u in used], "rows": rows})
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked before any work): replaced by the finished folder
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def summary(report: dict, out: Path) -> str:
    """One line of counts, then one line per skipped photo with its reason."""
    c = report["counts"]
    buckets = ", ".join(f"{k}: {v}" for k, v in c["buckets"].items())
    line = (f"prepared {c['used']} of {c['photos']} photos ({c['persons']} persons; buckets {buckets}; "
            f"{c['train_photos']} train, {c['val_photos']} val) into {out}; {c['skipped']} skipped")  # fmt: skip
    return "\n".join([line] + [f"  skipped {s['file']}: {s['reason']}" for s in report["skipped"]])


def main(argv: list[str] | None = None) -> int:
    """`python -m hyperlora.train prepare ...`: flags -> one prepare_folder call; boundary errors in one line."""
    p = argparse.ArgumentParser(prog="python -m hyperlora.train prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--src", required=True, help="the photo folder (images/ and captions.jsonl)")
    p.add_argument("--out", required=True, help="the prepared folder to write (pass it to training as --data)")
    p.add_argument("--pipeline", required=True, help="the SDXL diffusers pipeline folder (VAE, text encoders)")
    p.add_argument("--clip", required=True, help="the CLIP vision folder of the hypernetwork (ViT-L/14)")
    p.add_argument("--face-backend", required=True, choices=sorted(FACE_BACKENDS))
    p.add_argument("--insightface-root", default=None, help="antelopev2: the folder holding models/antelopev2/")
    p.add_argument("--max-images", type=int, default=None, help="only the first N photos of captions.jsonl")
    p.add_argument("--val-fraction", type=float, default=0.0, help="share of persons held out into OUT/val/")
    p.add_argument("--trigger-words", default=HyperLoRAConfig.trigger_words, help="the hypernetwork's trigger words")
    p.add_argument("--min-face-size", type=float, default=DEFAULT_MIN_FACE_SIZE, help="px, shorter face box side")
    p.add_argument("--seed", type=int, default=0, help="augmented copies and the val split")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    args = p.parse_args(argv)
    face_kwargs = {"root": args.insightface_root} if args.insightface_root else {}
    if face_kwargs and args.face_backend != "antelopev2":
        p.error("--insightface-root is for --face-backend antelopev2")
    try:
        prepare_folder(args.src, args.out, pipeline=args.pipeline, clip=args.clip, face_backend=args.face_backend,
                       face_kwargs=face_kwargs, trigger_words=args.trigger_words, max_images=args.max_images,
                       val_fraction=args.val_fraction, seed=args.seed, min_face_size=args.min_face_size,
                       device=args.device, progress=not args.quiet)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, ConditioningError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
