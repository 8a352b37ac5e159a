"""The evaluation protocol (peers-and-protocols §2): held-out identities -> personalise -> generate -> score.

    summary = run_evaluation(EvalConfig(world="toy", methods="hyperlora,base,renders"), "runs/eval/x")

Two worlds run the same code path. Per held-out identity ('test' split) the toy world (`ToyWorld`,
below) renders `num_references` reference photos whose looks differ from every look the selected
prompts ask for (so look leakage is measurable), each method personalises once (timed apart from
generation), and every prompt is generated with `seeds_per_prompt` dedicated generators seeded from
(seed, identity, prompt index, seed index), so a rerun is identical. The same seeds without any LoRA
(and without trigger words or rare tokens: the base model as a user would run it) give PuLID's
disruption CLIP-I and the non-face LPIPS; the toy CLIP's zero-shot classifiers predict the look
attributes for leakage and adherence. In the sdxl world (eval/sdxl_world.py: a diffusers SDXL
pipeline, CLIP ViT-L/14 and a folder of photos per real person) the references are each person's
first photos and the renders ceiling is their held-out photos; with no ground-truth looks, leakage
and adherence are None, with the reason in the summary's `not_available`. Metrics are
eval/metrics.py's; this file gathers features and records, eval/summary.py the summaries. Methods: eval/baselines.py.

out_dir gets config.json (with the command line and git commit), records.jsonl (one row per image),
summary.json + summary.csv (one row per method variant) and grid_<variant>.png
(references | one generation per prompt, a row per identity). Every summary row carries `weights`
and `label`: until the toy models pass their gates (toy), or while the SDXL pipeline or CLIP are RANDOM
stand-ins (sdxl), and until a trained HyperLoRA exists, the numbers are plumbing checks, not results.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm  # text bars, also inside a notebook: papermill streams them to the main job's terminal

from hyperlora.toy.identity import LOOK_ATTRIBUTES, split_identities
from hyperlora.toy.render import render, sample_look, visible_attributes

from . import metrics
from .prompts import Prompt, load_prompts
from .summary import (  # noqa: F401  (format_table: re-exported for notebooks and eval.run)
    _write_csv,
    format_table,
    json_default,
    summarize_run,
    write_grids,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("hyperlora", "hyperlora_other", "hyperlora_no_trigger", "base", "renders", "dreambooth", "hyperlora_ft",
           "zero_ft", "coef_ft", "coef_rows")  # fmt: skip


@dataclass
class EvalConfig:
    """One evaluation run; saved as config.json in the run folder."""

    world: str = "toy"  # "toy" (ground truth, CPU) or "sdxl" (real photos in `references`; eval/sdxl_world.py)
    methods: str = "hyperlora"  # comma-separated subset of METHODS, scored into one table
    num_identities: int = 8  # the first n identities of `split` (sdxl: of the sorted folders)
    split: str = "test"  # toy: "test" (held out, the reported figures), "val", or "train" (people the hypernetwork
    # trained on, new photos of them: how well it fits, against how well it generalises). sdxl: only "test" (the
    # user's folders are the split)
    num_references: int = 2  # reference photos per identity (HyperLoRA averages their coefficients)
    seeds_per_prompt: int = 4  # PuLID: 4 images per identity and prompt; >= 2 for LPIPS diversity
    prompts: str = "all"  # "all" or comma-separated indices into data/eval/prompts.json of the world
    steps: int = 20  # sampling steps (DPM++ 2M Karras)
    guidance: float = 5.0  # classifier-free guidance; HyperLoRA's usable range is 3-7
    size: int = 64  # image side in px; toy: 64. sdxl: 64 (left at default) means the pipeline's own size (1024)
    id_scale: float | None = None  # ID-LoRA scale at personalisation; None: the checkpoint's measured weight (its
    # config.json `id_weight`, hyperlora.checkpoint.recommended_id_weight), else the release's 0.85. Resolved at once,
    # so config.json records the number used
    base_scale: float = 0.0  # Base-LoRA scale (0: ID only, as the release)
    toy_dir: str = "data/toy"  # toy models: clip/ faces/ sdxl/ (python -m hyperlora.toy build)
    sdxl_path: str = ""  # sdxl world: diffusers SDXL pipeline folder (StableDiffusionXLPipeline.from_pretrained)
    clip_path: str = ""  # sdxl world: CLIP ViT-L/14 folder, the hypernetwork's image encoder and the CLIP-T/-I judge
    references: str = ""  # sdxl world: <name>/ photo folders; sorted, first num_references = references, rest held out
    insightface_root: str = ""  # sdxl world, antelopev2 backend: the folder holding models/antelopev2/*.onnx
    trait_reader: str = ""  # toy: identity-trait reader folder, the second ID judge (trait_match); empty: <toy_dir>/traits
    # when it exists (python -m hyperlora.toy train-traits), else trait_match is None
    judge_clip: str = ""  # CLIP folder that judges CLIP-T, CLIP-I and (toy) the prompt's looks: a CLIP that did not
    # condition the model, as judge_backend is for identity. Empty: toy <toy_dir>/clip_judge when it exists (python -m
    # hyperlora.toy train-clip), else the world's own CLIP (toy clip/, sdxl clip_path), as before
    checkpoint: str = ""  # HyperLoRA checkpoint folder; empty: a freshly initialised, UNTRAINED one
    coefficient_table: str = ""  # method coef_rows: fit folders (comma-separated) of `eval.coefficient_targets fit`
    face_backend: str = "toy"  # conditioning face backend (toy | dlib | antelopev2); sdxl: antelopev2 as the release
    judge_backend: str = "toy"  # ID-similarity judge; sdxl warns when it is the conditioning one (not independent)
    min_face_size: float = 8.0  # px; toy faces are ~25 px wide at 64 px
    det_threshold: float = 0.5  # toy detector score threshold (smoke detectors need 0 to find anything)
    dreambooth_steps: str = "50,100,200"  # cumulative step counts to score (also the *_ft methods')
    dreambooth_rank: int = 4
    dreambooth_lr: float = 1e-3
    finetune_lr: float = 1e-3  # the *_ft methods' (hyperlora/finetune.py): DreamBooth's lr
    device: str = "cpu"  # where the pipeline, the hypernetwork and DreamBooth run ("cuda" for real SDXL); the
    # judges (CLIP, face, LPIPS) stay on the CPU. Generators are CPU generators, so images do not depend on it
    dtype: str = "float32"  # the pipeline's and the hypernetwork's dtype ("float16" on a GPU); DreamBooth's LoRA
    # weights train in float32 whatever this is
    seed: int = 0  # evaluation seed: references and generators derive from it
    smoke: bool = False  # tiny sizes; marks every figure as plumbing

    def __post_init__(self):
        if self.id_scale is None:
            from hyperlora.checkpoint import recommended_id_weight

            self.id_scale = recommended_id_weight(self.checkpoint or None)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        return getattr(torch, self.dtype)

    def method_list(self) -> list[str]:
        names = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = set(names) - set(METHODS)
        if unknown or not names:
            raise ValueError(f"methods must be a comma-separated subset of {METHODS}, got {self.methods!r}")
        return names

    def step_counts(self) -> list[int]:
        counts = sorted({int(s) for s in self.dreambooth_steps.split(",") if s.strip()})
        if not counts or counts[0] < 1:
            raise ValueError(f"dreambooth_steps must list positive step counts, got {self.dreambooth_steps!r}")
        return counts

    def selected_prompts(self) -> list[tuple[int, Prompt]]:
        prompts = load_prompts(self.world)
        if self.prompts == "all":
            return list(enumerate(prompts))
        indices = [int(i) for i in self.prompts.split(",")]
        bad = [i for i in indices if not 0 <= i < len(prompts)]
        if bad:
            raise ValueError(f"prompt indices {bad} out of range: {self.world} has {len(prompts)} prompts")
        return [(i, prompts[i]) for i in indices]


def eval_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, identity, prompt index, seed index): the dedicated generator's."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def git_commit() -> str:
    try:
        def git(*args: str) -> str:
            done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
            return done.stdout.strip()

        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The toy world: models, references, generation


def reference_look_values(identity: int, prompts: list[Prompt], seed: int) -> dict[str, str]:
    """Categorical look values for an identity's references, each one asked for by as few selected prompts as
    possible (none, unless the prompts ask for every value of an attribute). Leakage is scored only where a
    prompt asks for a value unlike the reference's (`metrics.look_leakage`), so a shared value costs pairs, not
    correctness."""
    rng = np.random.default_rng([seed, identity, 7])
    asked: dict[str, dict[str, int]] = {}
    for prompt in prompts:
        for name, value in prompt.attributes.items():
            counts = asked.setdefault(name, {})
            counts[value] = counts.get(value, 0) + 1
    values = {}
    for name, options in LOOK_ATTRIBUTES.items():
        counts = asked.get(name, {})
        if name == "glasses" and asked.get("glasses_colour"):
            options = [o for o in options if o != "none"]  # glasses on, so their colour can leak
        fewest = min(counts.get(o, 0) for o in options)
        allowed = [o for o in options if counts.get(o, 0) == fewest]
        values[name] = str(rng.choice(allowed))
    return values


def _card_passed(folder: Path) -> bool:
    """Whether the model card in `folder` says its quality gates passed (no card: False)."""
    card = folder / "model_card.json"
    return card.is_file() and bool(json.loads(card.read_text()).get("passed"))


class ToyWorld:
    """The toy models (pipeline, CLIP, faces) loaded from `config.toy_dir`, and the held-out identities."""

    world = "toy"
    ceiling_source = "render"  # the renders method scores the renderer's images: the records' `source`
    ceiling_label = "real toy renders of the identity (ceiling; no model)"
    not_available: dict[str, str] = {}  # metric -> why it is None (the sdxl world has no ground-truth looks)

    def __init__(self, config: EvalConfig):
        from hyperlora.conditioning.backends import make_face_analyzer
        from hyperlora.toy.pipeline import clip_judge, load_toy_pipeline

        from .extractors import ClipExtractor, FaceEmbeddingExtractor, LPIPSModel

        self.config, self.dir = config, Path(config.toy_dir)
        self.pipe = load_toy_pipeline(self.dir / "sdxl", dtype=config.torch_dtype).to(config.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.clip_dir = self.dir / "clip"  # the hypernetwork's image encoder and the base model's text encoders
        default = self.dir / "clip_judge"
        self.judge_dir = Path(config.judge_clip) if config.judge_clip else default if default.is_dir() else self.clip_dir
        self.clip = ClipExtractor(self.judge_dir)  # the CLIP-T / CLIP-I judge (a missing --judge-clip raises, naming it)
        self.config = config = dataclasses.replace(config, judge_clip=str(self.judge_dir))  # config.json names it
        analyzer = make_face_analyzer(config.judge_backend, **self.backend_kwargs(config.judge_backend))
        self.face_judge = FaceEmbeddingExtractor(analyzer, min_face_size=config.min_face_size)
        self.attribute_judge = clip_judge(self.judge_dir)
        self.trait_judge = self._trait_judge(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-trunk warning: recorded as lpips_real in the summary
            self.lpips = LPIPSModel(seed=config.seed)
        self.identities = split_identities(config.split)
        self.prompts = [p for _, p in config.selected_prompts()]
        self.label = self._label()

    def _trait_judge(self, config: EvalConfig):
        """The identity-trait reader (hyperlora.toy.trait_reader): a judge that never conditioned the model."""
        from hyperlora.toy.trait_reader import TraitReader

        folder = Path(config.trait_reader) if config.trait_reader else self.dir / "traits"
        if not config.trait_reader and not folder.is_dir():
            self.not_available = {"trait_match": f"no trait reader at {folder} (python -m hyperlora.toy train-traits)"}
            return None
        return TraitReader.load(folder)  # a folder that was asked for and is missing raises, naming it

    def backend_kwargs(self, name: str) -> dict:
        return {"model_dir": self.dir / "faces", "det_threshold": self.config.det_threshold} if name == "toy" else {}

    def _label(self) -> str:
        """Whether the judges and the base model passed their quality gates (their model cards say), which CLIP
        judges, and whether this is a smoke run.

        The CLIP gate (zero-shot look accuracy) is a judge's gate: it is checked on the CLIP that judges CLIP-T and
        the looks. With a separate judge CLIP the world's own CLIP only conditions (text encoders, the hypernetwork's
        image features); how well the base model follows prompts through it is the base model's gate (sdxl/), and
        the label names the conditioning CLIP's own verdict so that a reader sees it."""
        judge_is_own = self.judge_dir.resolve() == self.clip_dir.resolve()
        folders = {"judge CLIP" if not judge_is_own else "clip": self.judge_dir,
                   **{name: self.dir / name for name in ("faces", "vae", "sdxl")}}  # fmt: skip
        failed = [name for name, folder in folders.items() if not _card_passed(folder)]
        self.gates_passed = not failed
        state = ("passed their quality gates" if self.gates_passed else
                 f"NOT at their quality gates ({', '.join(failed)}: see their model_card.json)")  # fmt: skip
        if not judge_is_own:
            own = "passed" if _card_passed(self.clip_dir) else "MISSED (see its model_card.json)"
            state += f"; CLIP-T and looks judged by {self.judge_dir}, not by the conditioning CLIP (its own gate {own})"
        split = "" if self.config.split == "test" else f", {self.config.split}-split people (not held out)"
        return f"toy models at {self.dir}: {state}" + split + (", smoke-size evaluation" if self.config.smoke else "")

    @property
    def plumbing_only(self) -> bool:
        """True while the numbers can only check plumbing (toy models below their gates, or a smoke run)."""
        return not self.gates_passed or self.config.smoke

    def identity(self, index: int) -> dict:
        """References of held-out identity `index` (one categorical look, varied pose and light) and their features."""
        identity = int(self.identities[index])
        values = reference_look_values(identity, self.prompts, self.config.seed)
        renders = [render(identity, sample_look(np.random.default_rng([self.config.seed, identity, r]), **values),
                          self.config.size) for r in range(self.config.num_references)]  # fmt: skip
        images = np.stack([r.image for r in renders])
        faces = [e for e in self.face_judge(images) if e is not None]
        crops = [r.image[max(int(r.box[1]), 0) : int(r.box[3]) + 1, max(int(r.box[0]), 0) : int(r.box[2]) + 1]
                 for r in renders]  # fmt: skip
        clip = torch.nn.functional.normalize(self.clip(crops).mean(0), dim=-1)
        face = np.mean(faces, 0) if faces else None
        return {"id": identity, "index": index, "images": images, "attributes": visible_attributes(renders[0].look),
                "face_embedding": None if face is None else face / np.linalg.norm(face), "clip_embedding": clip,
                "mean_mask": np.mean([r.mask for r in renders], 0) > 0.5, "n_reference_faces": len(faces)}  # fmt: skip

    def real_images(self, identity: dict, prompt: Prompt, seeds: list[int]) -> np.ndarray:
        """The renders ceiling: the identity rendered with the prompt's look (the rest of the look from each seed)."""
        looks = [sample_look(np.random.default_rng(s), **prompt.attributes) for s in seeds]
        return np.stack([render(identity["id"], look, self.config.size).image for look in looks])

    def generate(self, text: str, seeds: list[int]) -> np.ndarray:
        """uint8 [N, H, W, 3] from the shared pipeline as it stands (with whatever LoRA a method loaded into it);
        image i comes from its own generator seeded with seeds[i], so it does not depend on the batch."""
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        out = self.pipe([text] * len(seeds), num_inference_steps=self.config.steps, guidance_scale=self.config.guidance,
                   height=self.config.size, width=self.config.size, generator=generators, output_type="np")  # fmt: skip
        return (np.asarray(out.images) * 255).round().astype(np.uint8)


def build_smoke_toy(out_dir: str | Path) -> Path:
    """Plumbing-only toy models in seconds: the build's smoke CLIP, faces and VAE, an UNTRAINED tiny UNet, assembled.

    SDXL concatenates both text encoders' states: cross_attention_dim = 2 x the toy CLIP width; pooled = projection.
    Their detector finds nothing at the default threshold: evaluate with det_threshold=0, min_face_size=0.
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPConfig

    from hyperlora.toy.build import build
    from hyperlora.toy.pipeline import assemble_pipeline
    from hyperlora.toy.unet import UNetTrainConfig, build_toy_unet

    out = Path(out_dir)
    outcomes = build(out, smoke=True, only=["clip", "faces", "vae"])
    failed = {k: v for k, v in outcomes.items() if not v.startswith("done")}
    if failed:
        raise RuntimeError(f"smoke toy build failed: {failed}")
    text = CLIPConfig.from_pretrained(out / "clip")
    torch.manual_seed(0)
    config = UNetTrainConfig.smoke(block_out_channels=(16, 32), attention_heads=(1, 2),
                                   transformer_layers_per_block=(1, 1), layers_per_block=1)  # fmt: skip
    latent_channels = AutoencoderKL.load_config(out / "vae")["latent_channels"]
    unet = build_toy_unet(config, cross_attention_dim=2 * text.text_config.hidden_size, pooled_dim=text.projection_dim,
                          latent_channels=latent_channels)  # fmt: skip
    unet.save_pretrained(out / "unet")
    assemble_pipeline(out / "unet", out / "sdxl", clip_path=out / "clip", vae_path=out / "vae")
    return out


def load_world(config: EvalConfig):
    """The world's models, judges and identities; its `config` is `config` with the world's defaults resolved."""
    if config.world == "toy":
        return ToyWorld(config)
    if config.world == "sdxl":
        from .sdxl_world import SDXLWorld

        return SDXLWorld(config)
    raise ValueError(f"world must be 'toy' or 'sdxl', got {config.world!r}")


# ---------------------------------------------------------------------------------------------
# Features of one (identity, prompt) batch -> per-image records


def face_box_mask(analyzer, image: np.ndarray) -> np.ndarray | None:
    """Bool [H, W]: the first face `analyzer` detects in `image` (uint8 [H, W, 3]), its box; None when none is found."""
    faces = analyzer.detect(Image.fromarray(image))
    if not faces:
        return None
    x0, y0, x1, y1 = (round(v) for v in faces[0].bbox)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[max(y0, 0) : y1, max(x0, 0) : x1] = True
    return mask


def _face_masks(world, images: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Bool [N, H, W]: the judge's detected face box per image, else the references' mean face mask."""
    masks = np.repeat(fallback[None], len(images), 0)
    for i, image in enumerate(images):
        mask = face_box_mask(world.face_judge.analyzer, image)
        if mask is not None:
            masks[i] = mask
    return masks


def score_batch(world, identity: dict, prompt: Prompt, images: np.ndarray, baseline: np.ndarray | None) -> list[dict]:
    """Per-image metric values of one identity's generations for one prompt (seeds in order)."""
    gen_faces = world.face_judge(images)
    detected = [e is not None for e in gen_faces]
    if identity["face_embedding"] is None:
        id_sim = [float("nan")] * len(images)  # no reference face found: ID similarity undefined for this identity
    else:
        id_sim = metrics.id_similarity(identity["face_embedding"], gen_faces)["per_image"].tolist()
    clip = world.clip(images)
    text = world.clip.embed_text([prompt.text])[0]
    rows = [dict(detected=d, id_sim=s) for d, s in zip(detected, id_sim)]
    for row, t, f in zip(rows, metrics.clip_t(clip, text)["per_image_cosine"],
                         metrics.clip_i_fidelity(clip, identity["clip_embedding"])["per_image"]):  # fmt: skip
        row.update(clip_t=float(t), clip_i_fidelity=float(f))
    masks = _face_masks(world, images, identity["mean_mask"])
    for row, texture in zip(rows, metrics.face_texture(images, masks)["per_image"]):
        row["face_texture"] = float(texture)
    if baseline is not None:
        disruption = metrics.clip_i_disruption(clip, world.clip(baseline))["per_image"]
        preservation = metrics.lpips_preservation(images, baseline, masks, world.lpips)["per_image"]
        change = metrics.pixel_change(images, baseline)["per_image"]
        for row, d, p, c in zip(rows, disruption, preservation, change):
            row.update(clip_i_disruption=float(d), lpips_preservation=float(p), pixel_change=float(c))
    if world.trait_judge is not None:  # toy only: a real photo has no ground-truth traits (world.not_available)
        for row, match in zip(rows, world.trait_judge.match(images, identity["id"])):
            row["trait_match"] = float(match)
    if world.attribute_judge is not None:  # toy only: sdxl has no ground-truth looks to judge (world.not_available)
        for row, predicted in zip(rows, world.attribute_judge(images)):
            row["predicted"] = predicted
    return rows


# ---------------------------------------------------------------------------------------------
# The run


def _write_config(config: EvalConfig, out: Path, labels: dict) -> None:
    values = {"config": dataclasses.asdict(config), "command": " ".join(sys.argv), "argv": sys.argv,
              "git_commit": git_commit(), "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "labels": labels}  # fmt: skip
    (out / "config.json").write_text(json.dumps(values, indent=2) + "\n")


def _evaluate_identity(world, methods: dict, identity: dict, config: EvalConfig, out: Path,
                       progress: bool = True) -> tuple[list, list]:  # fmt: skip
    """Every method variant on one identity: (per-image records, per-variant personalisation timings)."""
    records, timings, prompts = [], [], config.selected_prompts()
    seeds = {p: [eval_seed(config.seed, identity["id"], p, s) for s in range(config.seeds_per_prompt)]
             for p, _ in prompts}  # fmt: skip

    def bar(what: str):
        return tqdm(prompts, desc=f"  identity {identity['id']}: {what}", unit="prompt", leave=False,
                    disable=not progress, mininterval=2)  # fmt: skip

    baseline = {p: world.generate(prompt.text, seeds[p]) for p, prompt in bar("base model")}  # same seeds, no LoRA
    for name, method in methods.items():
        for variant, timing, generate in method.variants(identity):
            timings.append({"variant": variant, "identity": identity["id"], **timing})
            for p, prompt in bar(variant):
                start = time.perf_counter()
                images = baseline[p] if generate is None else generate(prompt, seeds[p])
                ms = 1000 * (time.perf_counter() - start) / len(images)
                rows = score_batch(world, identity, prompt, images, baseline[p] if method.compares_to_base else None)
                for s, (row, image) in enumerate(zip(rows, images)):
                    path = out / "images" / variant / f"{identity['id']}_p{p:02d}_s{s}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(path)
                    records.append({"method": name, "variant": variant, "source": method.source,
                                    "identity": identity["id"],
                                    "identity_name": identity.get("name", ""),  # sdxl: its folder; toy: none
                                    "prompt_index": p,
                                    "prompt": prompt.text, "category": prompt.category, "seed_index": s,
                                    "eval_seed": seeds[p][s], "prompt_attributes": prompt.attributes,
                                    "reference_attributes": identity["attributes"], **row,
                                    "image": str(path.relative_to(out)), "generation_ms": ms})  # fmt: skip
    return records, timings


def run_evaluation(config: EvalConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Run the protocol and write config.json, records.jsonl, summary.json/.csv and grids into out_dir.

    progress: tqdm bars on stderr, one over identities and one per method variant over the prompts.
    """
    from .baselines import make_method

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world(config)
    config = world.config  # the world's defaults resolved (sdxl: the pipeline's image size)
    methods = {name: make_method(name, config, world) for name in config.method_list()}
    _write_config(config, out, {"world": world.label} | {name: m.label for name, m in methods.items()})
    records, timings, identities = [], [], []
    with torch.no_grad():  # DreamBooth turns gradients on for its own steps
        for index in tqdm(range(config.num_identities), desc=f"evaluation ({config.methods})", unit="identity",
                          disable=not progress):  # fmt: skip
            identity = world.identity(index)
            identities.append(identity)
            r, t = _evaluate_identity(world, methods, identity, config, out, progress)
            records += r
            timings += t
    with open(out / "records.jsonl", "w") as f:
        f.writelines(json.dumps(record, default=json_default) + "\n" for record in records)
    summary = summarize_run(records, timings, methods, world, config, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=json_default) + "\n")
    _write_csv(out / "summary.csv", summary["rows"])
    write_grids(out, records, identities)
    return summary
