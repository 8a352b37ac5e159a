"""The sdxl world of the evaluation protocol: a diffusers SDXL pipeline, CLIP ViT-L/14 and folders of real photos.

    run_evaluation(EvalConfig(world="sdxl", sdxl_path="models/sdxl", clip_path="models/clip-vit-large-patch14",
                              references="data/refs", checkpoint="models/sdxl_hyper_id_lora_v1_fidelity",
                              face_backend="antelopev2", insightface_root="models/insightface",
                              judge_backend="dlib", methods="hyperlora,base,renders"), "runs/eval/sdxl")

`SDXLWorld` offers run_evaluation, score_batch and eval/baselines.py what `ToyWorld` offers (identity(index),
generate(text, seeds), real_images(...), backend_kwargs(name), the judges, label, plumbing_only), so one code
path scores both worlds. What differs, and why:

- Identities are the subfolders of `references` (sorted by name; identity i is the i-th folder). In each, the
  first `num_references` photos (sorted by file name) are the references; the rest are held-out real photos
  of the same person, scored by the `renders` method as the ceiling (the toy world renders the identity).
  Files without an image suffix (IMAGE_SUFFIXES) and hidden files are not photos.
- No ground truth: real photos carry no look labels and the sdxl prompts name no attributes, so look leakage
  and per-attribute adherence are reported as None, with the reason in the summary's `not_available`.
- Images are square: photos are centre-cropped and resized to `size`. A size left at the toy default (64)
  means the pipeline's own default, default_sample_size * vae_scale_factor (1024 for SDXL); the resolved
  value is what `config` (and so config.json and every method) holds.
- Sampling is DPM++ 2M Karras on the pipeline's own noise schedule, as in the toy world, and every prompt
  gets the official workflows' negative prompt (hyperlora.worlds.sdxl.NEGATIVE_PROMPT).
- The label says whether the weights are real: a UNet of SDXL's published architecture and a ViT-L/14
  CLIP are taken as pretrained; anything else (e.g. hyperlora.worlds.sdxl.tiny_pipeline saved to a folder)
  is a RANDOM stand-in and makes every number a plumbing check. Real photos are the references either way.
- The pipeline, hypernetwork and DreamBooth run on `device` in `dtype` (EvalConfig; "cuda" and "float16" for real
  SDXL); the judges stay on the CPU. Only the CPU path is tested here (float32 and bfloat16): no GPU was lent.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hyperlora.conditioning.faces import choose_face
from hyperlora.conditioning.images import load_image
from hyperlora.worlds.sdxl import (
    CLIP_VISION_HIDDEN,
    NEGATIVE_PROMPT,
    SDXL_UNET_CONFIG,
    TINY_UNET_CONFIG,
    load_sdxl_pipeline,
    same_architecture,
)

from .prompts import Prompt

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
TOY_DEFAULT_SIZE = 64  # EvalConfig.size's default; in the sdxl world it means "the pipeline's default size"
VALIDATE_SIDE = 256  # photos are decoded once at this size when the world opens, so a bad file fails first
# Toy-only metrics: summary keys -> why the sdxl world cannot compute them.
TOY_ONLY = "needs ground-truth look attributes (references' and prompts'); only the toy world has them"
NOT_AVAILABLE = dict.fromkeys(("leakage_mean", "leakage_per_attribute", "adherence_mean", "adherence_per_attribute"),
                              TOY_ONLY)  # fmt: skip
NOT_AVAILABLE["trait_match"] = "needs the person's ground-truth identity traits; only the toy world has them"


def photo_paths(folder: Path) -> list[Path]:
    """The photos of one identity folder, sorted by file name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)  # fmt: skip


def scan_references(folder: str, *, num_identities: int, num_references: int,
                    held_out: bool) -> list[tuple[str, list[Path]]]:  # fmt: skip
    """(name, photos) of the first num_identities identity folders, every photo decoded once; clear errors otherwise.

    held_out: every evaluated identity needs photos beyond its references (the renders ceiling scores them).
    """
    expected = f"one subfolder of photos per identity ({folder or 'DIR'}/<name>/*.jpg)"
    if not folder:
        raise ValueError(f"EvalConfig.references is empty: the sdxl world needs a folder with {expected} "
                         "(--references)")  # fmt: skip
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"references folder {root} not found: expected a folder with {expected}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise ValueError(f"references folder {root} holds no identity subfolders: expected {expected}")
    if len(names) < num_identities:
        raise ValueError(f"references folder {root} holds {len(names)} identity subfolders ({', '.join(names)}), "
                         f"fewer than num_identities={num_identities}: add identities or pass "
                         f"--num-identities {len(names)}")  # fmt: skip
    identities = []
    for name in names[:num_identities]:
        paths = photo_paths(root / name)
        if len(paths) < num_references:
            raise ValueError(f"identity folder {root / name} holds {len(paths)} photos "
                             f"({'/'.join(IMAGE_SUFFIXES)}), fewer than num_references={num_references}: "
                             "add photos or lower --num-references")  # fmt: skip
        if held_out and len(paths) == num_references:
            raise ValueError(f"identity folder {root / name}: method renders scores held-out photos, but all "
                             f"{len(paths)} photos are references (num_references={num_references}): add at least "
                             "one more photo of this person, or leave renders out")  # fmt: skip
        for path in paths:
            load_image(path, max_side=VALIDATE_SIDE)  # raises ImageInputError naming the file and what is wrong
        identities.append((name, paths))
    return identities


def square(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int, float]]:
    """The centre square of a photo resized to uint8 [size, size, 3], and (left, top, scale): photo px -> square px."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
    return np.array(crop), (left, top, size / side)


def box_mask(bbox, left: int, top: int, scale: float, size: int) -> np.ndarray:
    """Bool [size, size]: a photo-pixel box (x0, y0, x1, y1) in the centre square `square` made (clipped to it)."""
    x0, y0, x1, y1 = (int(np.clip(round((v - offset) * scale), 0, size))
                      for v, offset in zip(bbox, (left, top, left, top)))  # fmt: skip
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = True
    return mask


class SDXLWorld:
    """A diffusers SDXL pipeline, CLIP ViT-L/14 (judge and image encoder) and the identities in `config.references`."""

    world = "sdxl"
    ceiling_source = "photo"  # the renders method scores held-out photos: the records' `source`
    ceiling_label = "held-out real photos of the identity (ceiling; no model)"
    not_available = NOT_AVAILABLE  # sdxl: no ground-truth look attributes, see TOY_ONLY
    attribute_judge = None  # sdxl: no zero-shot look classifier (the attributes it would judge are toy-only)
    trait_judge = None  # sdxl: no ground-truth identity traits for a real person (trait_match is toy-only)

    def __init__(self, config):
        from hyperlora.conditioning.backends import make_face_analyzer

        from .extractors import ClipExtractor, FaceEmbeddingExtractor, LPIPSModel

        if config.split != "test":  # the user's reference folders are the people scored; there is no train split
            raise ValueError(f"split={config.split!r} is toy-only: the sdxl world scores the folders in `references`")
        sdxl, clip = self._checked_paths(config)
        methods = config.method_list()
        self.identities = scan_references(config.references, num_identities=config.num_identities,
                                          num_references=config.num_references,
                                          held_out="renders" in methods)  # fmt: skip
        # DPM++ 2M Karras, the official workflows' sampler, on the model's own noise schedule
        self.pipe = load_sdxl_pipeline(sdxl, dtype=config.torch_dtype, device=config.device)
        self.pipe.set_progress_bar_config(disable=True)
        if config.size == TOY_DEFAULT_SIZE:  # left at its (toy) default: the pipeline's own size
            config = dataclasses.replace(config, size=self.pipe.default_sample_size * self.pipe.vae_scale_factor)
        self.config, self.clip_dir = config, clip  # clip_dir: the hypernetwork's image encoder
        self.judge_dir = Path(config.judge_clip) if config.judge_clip else clip
        self.config = config = dataclasses.replace(config, judge_clip=str(self.judge_dir))  # config.json names it
        self.clip = ClipExtractor(self.judge_dir)  # the CLIP-T / CLIP-I judge (default: the same CLIP)
        analyzer = make_face_analyzer(config.judge_backend, **self.backend_kwargs(config.judge_backend))
        self.face_judge = FaceEmbeddingExtractor(analyzer, min_face_size=config.min_face_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-trunk warning: recorded as lpips_real in the summary
            self.lpips = LPIPSModel(seed=config.seed)
        self.prompts = [p for _, p in config.selected_prompts()]
        self.label = self._label(methods)

    @staticmethod
    def _checked_paths(config) -> tuple[Path, Path]:
        """The pipeline and CLIP folders, or an error naming the path and what it should hold."""
        if not config.sdxl_path:
            raise ValueError("EvalConfig.sdxl_path is empty: the sdxl world needs a diffusers SDXL pipeline folder "
                             "(--sdxl-path DIR, as StableDiffusionXLPipeline.save_pretrained writes it)")  # fmt: skip
        if not config.clip_path:
            raise ValueError("EvalConfig.clip_path is empty: the sdxl world needs a CLIP ViT-L/14 folder "
                             "(--clip-path DIR: openai/clip-vit-large-patch14 with its tokenizer files)")  # fmt: skip
        sdxl, clip = Path(config.sdxl_path), Path(config.clip_path)
        if not (sdxl / "model_index.json").is_file():
            raise FileNotFoundError(f"no diffusers SDXL pipeline at {sdxl} (no model_index.json): expected a "
                                    "folder StableDiffusionXLPipeline.from_pretrained reads (unet/, vae/, "
                                    "text_encoder*/, ...)")  # fmt: skip
        if not (clip / "config.json").is_file():
            raise FileNotFoundError(f"no CLIP model at {clip} (no config.json): expected a transformers CLIPModel "
                                    "folder (openai/clip-vit-large-patch14: config.json, model.safetensors, "
                                    "preprocessor_config.json, tokenizer files)")  # fmt: skip
        return sdxl, clip

    def backend_kwargs(self, name: str) -> dict:
        """Keyword arguments of face backend `name` (make_face_analyzer) in this world."""
        if name == "antelopev2":  # the release's analyser: its ONNX files are found by path only
            if not self.config.insightface_root:
                raise ValueError("face backend antelopev2 needs --insightface-root DIR (the folder holding "
                                 "models/antelopev2/*.onnx)")  # fmt: skip
            return {"root": self.config.insightface_root}
        if name == "toy":  # the toy world's ONNX models on real photos: a plumbing check only
            return {"model_dir": Path(self.config.toy_dir) / "faces", "det_threshold": self.config.det_threshold}
        return {}

    def _label(self, methods: list[str]) -> str:
        """What the weights are (real or RANDOM stand-ins), the judges, and whether this is a smoke run."""
        unet = self.pipe.unet.config
        self.real_unet = same_architecture(unet, SDXL_UNET_CONFIG)
        if self.real_unet:
            unet_text = "SDXL-architecture UNet, taken as pretrained"
        elif same_architecture(unet, TINY_UNET_CONFIG):
            unet_text = "RANDOM stand-in: the tiny SDXL-layout UNet of hyperlora.worlds.sdxl"
        else:  # e.g. a distilled SDXL: the label cannot vouch for it, so its numbers count as plumbing
            widths = list(unet.block_out_channels)
            unet_text = f"RANDOM or unknown stand-in: not SDXL's UNet architecture (widths {widths})"
        from transformers import CLIPConfig

        vision = CLIPConfig.from_pretrained(self.clip_dir, local_files_only=True).vision_config
        self.real_clip = vision.hidden_size == CLIP_VISION_HIDDEN and vision.patch_size == 14
        clip_text = "ViT-L/14" if self.real_clip else f"RANDOM stand-in: width {vision.hidden_size}, not ViT-L/14"
        if self.judge_dir != self.clip_dir:  # a judge at least ViT-L's width (e.g. ViT-H/14) counts as real
            width = self.clip.model.config.vision_config.hidden_size
            self.real_clip &= width >= CLIP_VISION_HIDDEN
            clip_text += f"; CLIP-T judge {self.judge_dir} " + (f"(width {width})" if width >= CLIP_VISION_HIDDEN else
                                                                f"(RANDOM stand-in: width {width} < ViT-L's)")  # fmt: skip
        c = self.config
        judge = f"judge {c.judge_backend}"
        if "hyperlora" in methods and c.judge_backend == c.face_backend:
            judge += " (the conditioning backend itself: ID similarity is not an independent judgement)"
            warnings.warn(f"judge_backend={c.judge_backend!r} is also the conditioning face_backend: HyperLoRA is "
                          "scored by the model that conditioned it, so ID similarity is not independent "
                          "(pass another --judge-backend, e.g. dlib with antelopev2)",
                          UserWarning, stacklevel=3)  # fmt: skip
        return (f"sdxl world: pipeline {c.sdxl_path} ({unet_text}), CLIP {c.clip_path} ({clip_text}), "
                f"references {c.references} ({len(self.identities)} evaluated), conditioning {c.face_backend}, "
                f"{judge}") + (", smoke-size evaluation" if c.smoke else "")  # fmt: skip

    @property
    def plumbing_only(self) -> bool:
        """True when the numbers can only check plumbing (a RANDOM stand-in pipeline or CLIP, or a smoke run)."""
        return not (self.real_unet and self.real_clip) or self.config.smoke

    def _reference_face(self, photo: Image.Image):
        """The judge's largest face in a photo (as FaceEmbeddingExtractor picks it), or None."""
        faces = self.face_judge.analyzer.detect(photo)
        if not faces:
            return None
        face, _ = choose_face(faces, "largest", "reference photo")
        return face if min(face.width, face.height) >= self.config.min_face_size else None

    def identity(self, index: int) -> dict:
        """References of identity `index` (centre squares at `size`), their judge features and the held-out photos."""
        name, paths = self.identities[index]
        size, n = self.config.size, self.config.num_references
        photos = [load_image(p) for p in paths[:n]]
        squares = [square(photo, size) for photo in photos]
        faces = [self._reference_face(photo) for photo in photos]
        embeddings = [e for e in self.face_judge(photos) if e is not None]
        crops, masks = [], []
        for photo, face, (image, (left, top, scale)) in zip(photos, faces, squares):
            if face is None:  # no face found: CLIP-I compares with the whole reference
                crops.append(image)
                continue
            x0, y0, x1, y1 = (int(v) for v in face.bbox)
            crops.append(np.array(photo)[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1])
            masks.append(box_mask(face.bbox, left, top, scale, size))
        if not masks:  # no reference face: the fallback face region is the middle of a portrait
            masks = [np.zeros((size, size), bool)]
            masks[0][size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = True
        face = np.mean(embeddings, 0) if embeddings else None
        held_out = [square(load_image(p), size)[0] for p in paths[n:]]
        return {"id": index, "index": index, "name": name, "images": np.stack([image for image, _ in squares]),
                "photos": [str(p) for p in paths[:n]], "attributes": {},
                "held_out": np.stack(held_out) if held_out else np.zeros((0, size, size, 3), np.uint8),
                "face_embedding": None if face is None else face / np.linalg.norm(face),
                "clip_embedding": torch.nn.functional.normalize(self.clip(crops).mean(0), dim=-1),
                "mean_mask": np.mean(masks, 0) > 0.5, "n_reference_faces": len(embeddings)}  # fmt: skip

    def real_images(self, identity: dict, prompt: Prompt, seeds: list[int]) -> np.ndarray:
        """The renders ceiling: held-out photo i % count for seed index i. Real photos follow no prompt, so their
        CLIP-T is not a ceiling; their ID similarity and CLIP-I are."""
        held_out = identity["held_out"]
        return np.stack([held_out[i % len(held_out)] for i in range(len(seeds))])

    def generate(self, text: str, seeds: list[int]) -> np.ndarray:
        """uint8 [N, H, W, 3] from the shared pipeline as it stands (with whatever LoRA a method loaded into it);
        image i comes from its own generator seeded with seeds[i], so it does not depend on the batch."""
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        c = self.config
        out = self.pipe([text] * len(seeds), negative_prompt=[NEGATIVE_PROMPT] * len(seeds),
                        num_inference_steps=c.steps, guidance_scale=c.guidance, height=c.size, width=c.size,
                        generator=generators, output_type="np")  # fmt: skip
        return (np.asarray(out.images) * 255).round().astype(np.uint8)
