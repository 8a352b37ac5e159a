"""`python -m hyperlora generate` and `personalize`: face photos (and prompts) in, images and reusable LoRAs out.

generate writes into --out, all or nothing (a temporary folder beside it, moved into place at the end):
    images/p{prompt}_s{seed}.png                one per prompt and seed
    id_lora_kohya.safetensors                   the LoRA for ComfyUI / A1111 / kohya (as the release's Save-LoRA)
    id_lora_diffusers.safetensors               the same for diffusers' `pipe.load_lora_weights`
    contact_sheet.png                           references, the chosen face boxed | the generations
    record.json                                 everything needed to reproduce the run (see `_record`)
personalize writes the LoRA alone (kohya by default) to --out. Every reference photo is decoded before
anything is loaded, so a corrupt file fails at once and --out is left untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .schedulers import scheduler_names

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class WorldOptions:
    """Which world, which weights, where and how they run (flags of both commands)."""

    face: list[str] = field(default_factory=list, metadata={"help": "photos of one person (paths)", "required": True})
    world: str = field(default="toy", metadata={"help": "toy (shipped miniature models, CPU) or sdxl (local folders)"})
    checkpoint: str = field(default="", metadata={"help": "HyperLoRA folder; toy default data/toy/hyperlora"})
    pipeline: str = field(default="", metadata={"help": "sdxl: diffusers SDXL folder (toy: data/toy/sdxl)"})
    clip: str = field(default="", metadata={"help": "sdxl: CLIP ViT-L/14 folder; toy default data/toy/clip"})
    insightface_root: str = field(default="", metadata={"help": "sdxl: folder holding models/antelopev2/*.onnx"})
    face_backend: str = field(default="", metadata={"help": "face backend (toy: toy; sdxl: antelopev2, or dlib)"})
    pick: str = field(default="largest", metadata={"help": "the face of several: largest, best or an index"})
    id_weight: float | None = field(default=None, metadata={
        "help": "ID-LoRA weight (default: the checkpoint's measured one in its config.json, else the release's 0.85)"})
    base_weight: float = field(default=0.0, metadata={"help": "Base-LoRA weight (0: ID only, as the release)"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 (GPU) or bfloat16"})


@dataclass(kw_only=True)
class GenerateConfig(WorldOptions):
    prompt: list[str] = field(
        default_factory=list, metadata={"help": "prompts (trigger words added)", "required": True}
    )
    out: str = field(default="", metadata={"help": "output folder (new, or --overwrite)", "required": True})
    seed: int = field(default=0, metadata={"help": "image i of every prompt uses seed + i"})
    num_images: int = field(default=1, metadata={"help": "images per prompt"})
    steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the world's, 20)"})
    guidance: float | None = field(default=None, metadata={"help": "CFG scale (default: sdxl 5, toy 3.5)"})
    negative_prompt: str | None = field(default=None, metadata={"help": "default: sdxl the release's, toy none"})
    scheduler: str = field(default="dpmpp_2m_karras", metadata={"help": "sampler: " + ", ".join(scheduler_names())})
    size: int | None = field(default=None, metadata={"help": "image side in px (default: sdxl 1024, toy 64)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})


@dataclass(kw_only=True)
class PersonalizeConfig(WorldOptions):
    out: str = field(default="", metadata={"help": "the LoRA file to write (.safetensors)", "required": True})
    format: str = field(default="kohya", metadata={"help": "kohya (ComfyUI, A1111) or diffusers"})


def check_photos(paths: list[str]) -> None:
    """Decode every photo once (small) before anything slow: ImageInputError names a missing or corrupt file."""
    from .conditioning.images import load_image

    if not paths:
        raise ValueError("no --face photos given")
    for path in paths:
        load_image(path, max_side=256)


def load(options: WorldOptions):
    """The HyperLoRAPipeline of `options`' world, quiet while it loads."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .pipeline import HyperLoRAPipeline

    pick = int(options.pick) if options.pick.lstrip("-").isdigit() else options.pick
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = HyperLoRAPipeline.from_pretrained(
            options.world, checkpoint=options.checkpoint or None, pipeline=options.pipeline or None,
            clip=options.clip or None, insightface_root=options.insightface_root or None,
            face_backend=options.face_backend or None, device=options.device, dtype=options.dtype,
            scheduler=getattr(options, "scheduler", None), pick=pick,
        )  # fmt: skip
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    pipe.pipe.set_progress_bar_config(disable=True)
    if _is_plumbing(pipe.label):
        log.warning("*** %s ***", pipe.label)
    return pipe


def personalize(pipe, options: WorldOptions):
    """`pipe.personalize` from the photos, then each skipped photo and each warning printed once (the conditioner's
    Python warnings about the same photos are not repeated; others are printed too)."""
    with warnings.catch_warnings(record=True) as caught:  # the filters in place still apply
        result = pipe.personalize(options.face, id_scale=options.id_weight, base_scale=options.base_weight)
    lines = [f"skipped {name}: {reason}" for name, reason in result.skipped.items()] + result.warnings
    for warning in caught:
        text = str(warning.message)
        if not any(part in text for part in [*result.skipped.values(), *result.warnings]):
            lines.append(text)
    for line in lines:
        log.warning("%s", line)
    return result


def call_kwargs(config: GenerateConfig, defaults: dict) -> dict:
    """The pipeline keyword arguments: the world's defaults, overridden by the flags given."""
    kwargs = dict(defaults)
    if config.steps is not None:
        kwargs["num_inference_steps"] = config.steps
    if config.guidance is not None:
        kwargs["guidance_scale"] = config.guidance
    if config.negative_prompt is not None:  # "" turns the world's negative prompt off
        kwargs["negative_prompt"] = config.negative_prompt or None
    if config.size is not None:
        kwargs.update(height=config.size, width=config.size)
    return kwargs


def load_for(config, out: Path):
    """Refuse an existing --out (unless --overwrite), decode every photo, then load the world: (pipe, loading ms)."""
    refuse_existing(out, config.overwrite)
    check_photos(config.face)
    start = time.perf_counter()
    pipe = load(config)
    return pipe, 1000 * (time.perf_counter() - start)


def run_generate(config: GenerateConfig, argv: list[str] | None = None) -> Path:
    """Personalise from the photos, generate every prompt at every seed, write --out all at once."""
    out = Path(config.out or "")
    if not config.out or not config.prompt:
        raise ValueError("generate needs --out and at least one --prompt")
    pipe, loading_ms = load_for(config, out)
    with staged_folder(out) as tmp:
        result = personalize(pipe, config)
        loras = {}
        for branch in result.loras:
            for format in ("kohya", "diffusers"):
                path = pipe.save_lora(
                    tmp / f"{branch}_lora_{format}.safetensors", branch=branch, format=format, seed=config.seed
                )
                loras[f"{branch}_{format}"] = path.name
        images = _generate_images(pipe, config, tmp)
        boxes = face_boxes(pipe.conditioner, config.face, result.features.sources)
        _contact_sheet(pipe, config, boxes, images, tmp)
        record = _record(pipe, config, result, boxes, images, loras, loading_ms, argv)
        (tmp / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def refuse_existing(out: Path, overwrite: bool) -> None:
    """FileExistsError when `out` holds anything and --overwrite was not given."""
    if (out.is_file() or (out.is_dir() and any(out.iterdir()))) and not overwrite:
        raise FileExistsError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")


@contextlib.contextmanager
def staged_folder(out: Path):
    """A temporary folder beside `out`, moved into place (replacing `out`) when the block succeeds and removed when
    it fails, so `out` is written all or nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _usual_permissions(tmp)
        yield tmp
        for path in tmp.glob("*.safetensors"):
            _usual_permissions(path)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_permissions(path: Path) -> None:
    """What the umask gives a new file or folder (mkdtemp and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _generate_images(pipe, config: GenerateConfig, folder: Path) -> list[dict]:
    """Every prompt at seeds seed .. seed + num_images - 1, each image from its own CPU generator."""
    from tqdm.auto import tqdm

    kwargs = call_kwargs(config, pipe.defaults)
    (folder / "images").mkdir()
    jobs = [(p, prompt, i) for p, prompt in enumerate(config.prompt) for i in range(config.num_images)]
    images = []
    for p, prompt, i in tqdm(jobs, desc="generating", unit="image", disable=len(jobs) < 2):
        seed = config.seed + i
        start = time.perf_counter()
        image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0]
        name = f"images/p{p:02d}_s{seed}.png"
        image.save(folder / name)
        images.append({"file": name, "prompt_index": p, "prompt": prompt, "prompt_as_sent": pipe.prompt_as_sent(prompt),
                       "seed": seed, "ms": round(1000 * (time.perf_counter() - start), 1)})  # fmt: skip
    return images


def face_boxes(conditioner, sources: list[str], used: list[str]) -> list:
    """The chosen face's box in each photo as the conditioner chose it (None: skipped)."""
    from .conditioning.images import ConditioningError, load_image

    boxes = []
    for source in sources:
        if source not in used:
            boxes.append(None)
            continue
        try:
            options = {k: conditioner.options[k] for k in ("pick", "min_face_size")}
            face, _ = conditioner.analyzer.analyze_reference(load_image(source), with_embedding=False, **options)
            boxes.append([round(float(v), 1) for v in face.bbox])
        except ConditioningError:
            boxes.append(None)
    return boxes


def _contact_sheet(pipe, config: GenerateConfig, boxes: list, images: list[dict], folder: Path) -> None:
    from PIL import Image

    from .conditioning.images import load_image
    from .viz import contact_sheet

    rows = [[Image.open(folder / m["file"]) for m in images if m["prompt_index"] == p] for p in range(len(config.prompt))]  # fmt: skip
    title = f"id weight {pipe.current.scales['id']:g}" + ("  [UNTRAINED / stand-in weights]" if _is_plumbing(pipe.label) else "")
    sheet = contact_sheet(
        [load_image(f) for f in config.face], boxes, rows, row_labels=list(config.prompt), title=title
    )
    sheet.save(folder / "contact_sheet.png")


def _is_plumbing(label: str) -> bool:
    return any(word in label for word in ("UNTRAINED", "NOISE", "RANDOM"))


def _versions() -> dict:
    import diffusers
    import transformers

    from . import __version__
    from .toy.cards import git_commit

    return {"hyperlora": __version__, "git_commit": git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}  # fmt: skip


def _record(pipe, config: GenerateConfig, result, boxes, images, loras, loading_ms: float, argv) -> dict:
    """record.json: the command, versions, weights, sampling, prompts as sent, per-photo outcome, timings."""
    from .schedulers import describe_scheduler

    features = result.features
    photos = [{"source": source, "used": source in features.sources, "skipped_reason": features.failures.get(source),
               "face_box": box, "warnings": [w for w in features.warnings if w.startswith(f"{source}:")]}
              for source, box in zip(config.face, boxes)]  # fmt: skip
    prompts = [{"prompt": p, "prompt_as_sent": pipe.prompt_as_sent(p), "trigger_words_added": pipe.prompt_as_sent(p) != p}
               for p in config.prompt]  # fmt: skip
    sampling = {**call_kwargs(config, pipe.defaults), "scheduler": config.scheduler,
                "scheduler_config": describe_scheduler(pipe.pipe.scheduler)}  # fmt: skip
    timings = {"loading_ms": round(loading_ms, 2), **{f"{k}_ms": round(v, 2) for k, v in result.timings_ms.items()},
               "generation_ms_per_image": round(sum(m["ms"] for m in images) / max(len(images), 1), 2)}  # fmt: skip
    return {
        "command": shlex.join(["python", "-m", "hyperlora", *(argv if argv is not None else sys.argv[1:])]),
        "config": dataclasses.asdict(config),
        "versions": _versions(),
        "label": pipe.label,
        "world": config.world,
        "checkpoint": {"path": config.checkpoint or None, "hyperlora_config": pipe.hyperlora.config.to_dict()},
        "weights": {"id": result.scales["id"], "base": config.base_weight},
        "trigger_words": pipe.trigger_words,
        "prompts": prompts,
        "sampling": sampling,
        "seeds": sorted({m["seed"] for m in images}),
        "images": images,
        "loras": loras,
        "photos": photos,
        "warnings": list(features.warnings),
        "skipped": dict(features.failures),
        "source_images_sha256": result.source_hash,
        "timings": timings,
    }


def run_personalize(config: PersonalizeConfig) -> Path:
    """Photos -> one LoRA file (written beside its place, then moved in)."""
    out = Path(config.out or "")
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {config.out!r}: personalize writes one .safetensors file")
    check_photos(config.face)
    pipe = load(config)
    personalize(pipe, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial.safetensors")
    try:
        pipe.save_lora(tmp, format=config.format)
        _usual_permissions(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
