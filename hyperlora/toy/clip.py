"""The toy CLIP: a small transformers `CLIPModel` trained contrastively on toy renders and captions.

It plays two parts in the toy world, as CLIP does in the real one: its text tower is both SDXL
text encoders of the toy base model (`CLIPTextModel` / `CLIPTextModelWithProjection`), and its
vision tower's `hidden_states[-2]` are the hypernetwork's CLIP image features
(`CLIPVisionModelWithProjection`). The folder written by `train_clip` holds the weights
(safetensors), the real CLIP BPE tokenizer and a `CLIPImageProcessor` for 64 px images, so every
standard loader reads it offline. Weights are stored in float16 (the vocabulary's 49,408
embeddings dominate the size) and the config declares float32 (`declare_float32`), so a plain
`from_pretrained` runs on a CPU.

Training is CLIP's symmetric InfoNCE with a learnable temperature (AdamW, cosine schedule) over
pre-rendered training renders. Half of the captions are rebuilt each step to name a random subset of
the look attributes (`partial_caption`), like the short zero-shot prompts; since such a caption is
true of many images in the batch, the loss counts every true pair, known from the renders' ground
truth, as a positive (`multi_positive_loss`, UniCL). Three supervised terms help the shapes, which the
contrastive loss alone left at chance: an image-label term (`label_loss`); on the vision tower only,
linear attribute heads that are discarded after training (`AttributeHeads`); and feature distillation
from a small CNN trained first on the same renders with labels (`teacher.py`, `DistillHeads`), which
reads every attribute at 0.99 (linear probes on the ViT trained without it: 0.77). `HardBatches`
optionally builds batches whose images share some look attributes. Those pieces live in
`clip_objectives.py`; this file builds, trains, saves and evaluates the model.

Gate (`evaluate_clip`): zero-shot classification of every look attribute on held-out ('test')
identities, >= 95 % averaged over attributes, with CLIP-style prompt ensembles in caption words.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTokenizer,
                          CLIPVisionConfig, get_cosine_schedule_with_warmup)  # fmt: skip
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..config import strict_from_dict
from ..tokenizer import clip_tokenizer
from .cards import write_model_card
from .data import ToyPortraits, render_arrays, split_renders, to_tensor
from .clip_objectives import (AttributeHeads, DistillHeads, HardBatches, caption_targets, label_loss,
                              multi_positive_loss, partial_caption)  # fmt: skip
from .identity import BACKGROUND_PHRASES, EXPRESSION_PHRASES, HAIR_PHRASES, LOOK_ATTRIBUTES, a_or_an
from .render import split_identities
from .teacher import attribute_labels, distillation_targets, evaluate_attribute_cnn, fit_attribute_cnn

log = logging.getLogger(__name__)

ZERO_SHOT_GATE = 0.95  # mean zero-shot attribute accuracy the toy CLIP must reach on 'test'
EVAL_SEED = 20250  # data seed of the evaluation renders: identical images run to run
BOS, EOS = 49406, 49407  # <|startoftext|>, <|endoftext|> in the CLIP BPE vocabulary


@dataclass
class CLIPTrainConfig:
    """Architecture, data and optimisation of the toy CLIP; saved in its model card."""

    # architecture
    image_size: int = 64  # renders are 64 x 64; the image processor resizes/crops to this
    patch_size: int = 8  # 8 x 8 patches: 64 image tokens + CLS
    vision_hidden: int = 192  # vision width = the hypernetwork's CLIP feature size
    vision_layers: int = 4  # hidden_states[-2] (the features) is the output of layer 3
    vision_heads: int = 3  # 64 dims per head
    text_hidden: int = 64  # text width = each toy SDXL text encoder's width. The 49,408-token vocabulary
    # dominates the size and is stored three times (here and as both SDXL text encoders): at 128 wide the
    # shipped toy world would pass its 60 MB budget
    text_layers: int = 4
    text_heads: int = 2
    projection_dim: int = 128  # shared embedding space (also text_embeds of the 2nd SDXL encoder)
    mlp_ratio: int = 4  # intermediate size = mlp_ratio x hidden
    # data
    num_train: int = 5000  # training identities 0..num_train-1 (never a held-out one)
    images_per_identity: int = 8  # renders per identity, pre-rendered into memory once (40,000: 1.3 GB of teacher
    # targets). At 2,000 x 4 the CLIP overfitted: zero-shot 0.974 on its own training renders against 0.914 on
    # test (expression 0.83 / 0.61, glasses 0.96 / 0.79). At 5,000 x 4 test read 0.927, at 5,000 x 8 0.935 (val
    # 0.932 / 0.933 against 0.928), with training renders at 0.935 too: no gap left. Rendering 40,000 takes 74 s
    # and the step count is unchanged: 2,856 s with the teacher beside another CLIP run, 2,792 s in the last build
    data_seed: int = 0  # seed of the training renders
    # optimisation
    steps: int = 2800  # AdamW steps: ~32 min on one thread (after the 12-minute teacher) beside the VAE in the build
    batch_size: int = 64  # contrastive batch: more negatives per step, but slower steps
    lr: float = 1e-3  # peak learning rate after warmup, cosine decay to 0. At 2e-3 (same steps) val and test read
    # 0.942 against 0.933 / 0.935 (expression 0.82, glasses 0.76, clothing colour down to 0.96): short of the gate
    # too, and not adopted, since the shipped base model's text encoders would have to be retrained with it
    weight_decay: float = 0.1  # on matrices only (not on norms, biases, embeddings, temperature)
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max gradient norm
    hard_batches: float = 0.0  # share of batches whose images share 1..hard_fixed look attributes (see HardBatches)
    hard_fixed: int = 2  # most attributes held fixed in a hard batch
    partial_captions: float = 0.5  # share of captions rebuilt each step from a random subset of attributes.
    # With full captions only, zero-shot accuracy stayed at 0.3-0.4 for 2,000 steps: every caption names
    # every attribute, so single-attribute prompts were never seen. Partial captions are true of many
    # images in a batch, so the loss treats every true pair as a positive (`multi_positive_loss`).
    partial_keep: float = 0.4  # probability that a partial caption names each visible attribute (>= 1 named)
    label_weight: float = 1.0  # weight of the image-label term (`label_loss`); 0 turns it off. Without it,
    # colours alone separate a batch, and shapes (pattern, clothing type, hairstyle, expression) stayed near
    # chance: zero-shot mean 0.41 after 1,250 steps with partial captions, 0.39 after 2,000 without
    head_weight: float = 1.0  # weight of the auxiliary attribute heads (`AttributeHeads`): linear classifiers of
    # every look attribute on the vision tower's pooled CLS state, trained with it and thrown away after. The label
    # term alone gives the vision tower little to learn shapes from while the text tower cannot yet tell
    # "hoodie" from "suit": after 2,000 steps a linear probe of the shipped CLIP's image features read clothing
    # type 0.32, hairstyle 0.37 and expression 0.22, while the same ViT trained on these heads alone reached
    # clothing type 0.59 and pattern 0.80 after 470 steps. With the heads, 2,000 steps gave a test zero-shot mean
    # of 0.662 (0.573 without) and linear-probe clothing type 0.44, hairstyle 0.51, expression 0.24. 0: no heads
    distill_weight: float = 30.0  # weight of feature distillation from a supervised CNN teacher (`teacher.py`,
    # `DistillHeads`): the ViT's patch tokens regress the teacher's feature map on the same grid, its pooled
    # state the teacher's pooled features. The teacher is trained first, on the same renders. 0: no teacher.
    # Val zero-shot mean after 2,800 steps: 0.885 at weight 3, 0.892 at 10, 0.928 at 30 (test 0.897 / 0.897 /
    # 0.914; without distillation the CLIP shipped before read 0.745 on test); at 700 steps 0.53 / 0.60 / 0.68 / 0.72
    # for weights 1 / 3 / 10 / 30
    teacher_steps: int = 1500  # the teacher's AdamW steps (batch 64; ~12 min on one thread at the default widths)
    teacher_widths: tuple[int, ...] = (32, 64, 96, 128)  # its conv blocks; block 3 (8 x 8) meets the 8 x 8 patch grid
    distill_sub: int = 1  # > 1: each patch token also regresses the teacher's finer map (16 x 16 at 2) as its
    # distill_sub x distill_sub cells: detail finer than a patch (`distillation_targets(sub=)`). At 2 it was no
    # better on val after 2,800 steps (0.923 against 0.928; test 0.923 against 0.914; expression 0.66, glasses 0.80)
    init_logit_scale: float = math.log(1 / 0.07)  # learnable temperature, CLIP's initial value
    max_logit_scale: float = 100.0  # clamp on exp(logit_scale) after every step, as in CLIP
    seed: int = 0  # model initialisation and batch order
    threads: int = 1  # torch CPU threads; on the shared 2-core box 2 threads ran ~9x slower than 1
    # evaluation and saving
    eval_identities: int | None = None  # 'test' identities evaluated for the gate (None: all 200)
    eval_per_identity: int = 2  # renders per 'test' identity for the gate
    save_dtype: str = "float16"  # dtype of the shipped weights (keeps the folder under ~20 MB)
    log_every: int = 50  # steps between log lines
    eval_every: int = 0  # steps between zero-shot checks on 'val' renders, kept in the card (0: none)
    val_identities: int = 100  # 'val' identities (one render each) for those checks

    def __post_init__(self):
        self.teacher_widths = tuple(self.teacher_widths)

    @classmethod
    def smoke(cls, **overrides) -> "CLIPTrainConfig":
        """Tiny sizes and a handful of steps: checks the plumbing in seconds, learns nothing."""
        values = dict(vision_hidden=32, vision_layers=2, vision_heads=2, text_hidden=32, text_layers=2,
                      text_heads=2, projection_dim=16, num_train=8, images_per_identity=2, steps=3,
                      batch_size=8, warmup_steps=1, eval_identities=8, eval_per_identity=1, log_every=1,
                      teacher_steps=2, teacher_widths=(4, 8, 8))  # fmt: skip
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "CLIPTrainConfig":
        """The config of a model card (`read_model_card(folder)["config"]`); unknown keys raise."""
        return strict_from_dict(cls, values)


def build_clip(config: CLIPTrainConfig) -> CLIPModel:
    """A randomly initialised CLIPModel of the configured size (seeded by `config.seed`)."""
    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=config.text_hidden, intermediate_size=config.mlp_ratio * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads, max_position_embeddings=77,
        projection_dim=config.projection_dim, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS, hidden_act="gelu",
    )  # fmt: skip
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden, intermediate_size=config.mlp_ratio * config.vision_hidden,
        num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads, image_size=config.image_size,
        patch_size=config.patch_size, projection_dim=config.projection_dim, hidden_act="gelu",
    )  # fmt: skip
    clip_config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             projection_dim=config.projection_dim, logit_scale_init_value=config.init_logit_scale)
    torch.manual_seed(config.seed)
    return CLIPModel(clip_config)


def image_processor(image_size: int) -> CLIPImageProcessor:
    """CLIP preprocessing for the toy size: shortest edge -> image_size, centre crop, CLIP mean/std."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)  # fmt: skip


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] renders at the model's size -> normalised [N, 3, H, W]: what the
    image processor computes for them, without PIL round trips (checked in the tests)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def declare_float32(folder: str | Path) -> None:
    """Mark a transformers model folder whose weights are stored in half precision as float32 to compute in:
    transformers 5 loads in the config's `dtype` by default, so a plain `from_pretrained(folder)` then
    upcasts on load and runs on a CPU (and beside the float32 diffusers parts) without a `dtype=` argument."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    for key in ("text_config", "vision_config"):
        if isinstance(config.get(key), dict):  # read alone by CLIPVisionModelWithProjection / CLIPTextModel
            config[key]["dtype"] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_clip(model: CLIPModel, folder: str | Path, image_size: int, dtype: str = "float16") -> Path:
    """Weights (safetensors, `dtype`; the config says float32, see `declare_float32`), tokenizer files and
    image processor: a self-contained folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    declare_float32(folder)
    clip_tokenizer(folder).save_pretrained(folder)
    # vocab.json + merges.txt rebuild the same tokenizer (the tests compare ids): drop its 3.6 MB cache
    (folder / "tokenizer.json").unlink(missing_ok=True)
    image_processor(image_size).save_pretrained(folder)
    return folder


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-d weight matrices only; embeddings, norms, biases and the temperature are free."""
    decay, free = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embedding" not in name else free).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]


def _teacher_targets(config: CLIPTrainConfig, arrays: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train the CNN teacher on the training renders; its standardised targets for every render, and its
    per-attribute accuracy on 'val' renders (for the card)."""
    images = to_tensor(arrays["images"])
    teacher = fit_attribute_cnn(images, attribute_labels(arrays), widths=config.teacher_widths,
                                steps=config.teacher_steps, seed=config.seed)  # fmt: skip
    val = split_renders("val", config.val_identities, 1, EVAL_SEED, config.image_size)
    figures = evaluate_attribute_cnn(teacher, to_tensor(val["images"]), attribute_labels(val))
    log.info("CNN teacher: val attribute accuracy %.3f", figures["mean"])
    dense, pooled = distillation_targets(teacher, images, config.image_size // config.patch_size,
                                         sub=config.distill_sub)
    return dense, pooled, figures


def _training_data(config: CLIPTrainConfig) -> tuple[torch.utils.data.Dataset, dict]:
    data = ToyPortraits(split_identities("train", config.num_train), config.images_per_identity, config.data_seed,
                        size=config.image_size)  # fmt: skip
    arrays = render_arrays(data)
    dataset = torch.utils.data.TensorDataset(pixel_values(arrays["images"]), torch.arange(len(data)))
    return dataset, arrays


def _batch_texts(indices: list[int], arrays: dict, share: float, rng: np.random.Generator, keep: float = 0.4
                 ) -> tuple[list[str], list[dict[str, str] | None]]:
    """The captions of a batch, a `share` of them replaced by partial captions, and what each names
    (None for a full caption)."""
    texts, named = [], []
    for i in indices:
        if rng.random() < share:
            text, names = partial_caption(arrays["attributes"][i], rng, keep)
        else:
            text, names = arrays["captions"][i], None
        texts.append(text)
        named.append(names)
    return texts, named


def train_clip(config: CLIPTrainConfig, out_dir: str | Path, *, evaluate: bool = True) -> Path:
    """Train a toy CLIP, save it into `out_dir`, evaluate it there and write its model card."""
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    tokenizer = clip_tokenizer(out_dir)
    dataset, arrays = _training_data(config)
    if config.batch_size > len(dataset):
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(dataset)} training renders")
    sampler = HardBatches(arrays["attributes"], config.batch_size, hard=config.hard_batches,
                          max_fixed=config.hard_fixed, seed=config.seed)  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    start, figures = time.time(), {}
    if config.distill_weight:
        dense, pooled, figures["teacher_val"] = _teacher_targets(config, arrays)
        distill = DistillHeads(config.vision_hidden, dense.shape[-1], pooled.shape[-1])
    model = build_clip(config)
    heads = AttributeHeads(config.vision_hidden)
    trained = [model] + [heads] * bool(config.head_weight) + [distill] * bool(config.distill_weight)
    groups = _param_groups(torch.nn.ModuleList(trained), config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    model, heads, optimizer, loader, schedule = accelerator.prepare(model, heads, optimizer, loader, schedule)
    if config.distill_weight:
        distill = accelerator.prepare(distill)
        dense, pooled = dense.to(accelerator.device), pooled.to(accelerator.device)
    log.info("toy CLIP: %.2f M parameters, %d training renders", sum(p.numel() for p in model.parameters()) / 1e6,
             len(dataset))  # fmt: skip
    val = split_renders("val", config.val_identities, 1, EVAL_SEED, config.image_size) if config.eval_every else None
    step, batches, curve, checking = 0, iter(loader), [], 0.0
    caption_rng = np.random.default_rng([config.seed, 1])
    model.train()
    with tqdm(total=config.steps, desc="toy CLIP", mininterval=2) as bar:
        while step < config.steps:
            images, indices = next(batches)  # HardBatches never runs out
            texts, named = _batch_texts(indices.tolist(), arrays, config.partial_captions, caption_rng,
                                        config.partial_keep)  # fmt: skip
            batch_attributes = [arrays["attributes"][i] for i in indices.tolist()]
            truth = caption_targets(named, batch_attributes)
            tokens = tokenizer(texts, padding="longest", truncation=True, max_length=77, return_tensors="pt")
            output = model(**tokens.to(accelerator.device), pixel_values=images)
            loss = multi_positive_loss(output.logits_per_image, truth.to(images.device))
            if config.label_weight:
                labels = label_loss(accelerator.unwrap_model(model), tokenizer, output.image_embeds, batch_attributes,
                                    caption_rng, images.device)  # image_embeds: already unit vectors  # fmt: skip
                loss = loss + config.label_weight * labels
            # the final states after post_layernorm; the CLS one is what the projection reads
            # (transformers 5 overwrites pooler_output with the projection's input)
            states = accelerator.unwrap_model(model).vision_model.post_layernorm(
                output.vision_model_output.last_hidden_state)
            if config.head_weight:
                loss = loss + config.head_weight * heads(states[:, 0], batch_attributes)
            if config.distill_weight:
                loss = loss + config.distill_weight * distill(states, dense[indices], pooled[indices])
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                accelerator.unwrap_model(model).logit_scale.clamp_(0, math.log(config.max_logit_scale))
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                scale = accelerator.unwrap_model(model).logit_scale.exp().item()
                bar.set_postfix(loss=f"{loss.item():.3f}", temp=f"{scale:.1f}")
                log.info("step %d/%d loss %.4f logit scale %.1f", step, config.steps, loss.item(), scale)
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                check = time.time()
                seconds = check - start - checking
                curve.append(_val_check(accelerator.unwrap_model(model), tokenizer, val, step, seconds))
                checking += time.time() - check
    seconds = time.time() - start - checking  # training only: the val checks are not counted
    save_clip(accelerator.unwrap_model(model), out_dir, config.image_size, config.save_dtype)
    figures, gates = {"steps": step, **figures, **({"val_curve": curve} if curve else {})}, {}
    if evaluate:
        figures.update(evaluate_clip(out_dir, n_per_identity=config.eval_per_identity,
                                     num_identities=config.eval_identities, threads=config.threads))  # fmt: skip
        gates[f"zero_shot_mean >= {ZERO_SHOT_GATE}"] = figures["zero_shot_mean"] >= ZERO_SHOT_GATE
    write_model_card(out_dir, name="toy CLIP", config=config, train_seconds=seconds, figures=figures,
                     gates=gates, summary="A small CLIPModel trained contrastively on toy portraits and their "
                     "captions: the toy world's text encoders and the hypernetwork's image features.")  # fmt: skip
    return out_dir


def _val_check(model: CLIPModel, tokenizer: CLIPTokenizer, val: dict, step: int, seconds: float) -> dict:
    """Zero-shot figures on the in-memory 'val' renders during training (model back in train mode after)."""
    model.eval()
    figures = clip_figures(model, tokenizer, embed_pixels(model, pixel_values(val["images"])), val)
    model.train()
    per = " ".join(f"{name} {value:.2f}" for name, value in figures["zero_shot"].items())
    log.info("step %d (%.0f s): val zero-shot mean %.3f, i2t R@1 %.3f (%s)", step, seconds, figures["zero_shot_mean"],
             figures["i2t_r1"], per)  # fmt: skip
    return {"step": step, "seconds": round(seconds, 1), **figures}


# ---------------------------------------------------------------------------------------------
# Evaluation


def attribute_prompts(attribute: str) -> dict[str, list[str]]:
    """Zero-shot prompts per value of a look attribute, in the captions' words. Each value gets a
    small ensemble (CLIP's prompt ensembling) over the wordings that captions pair it with, e.g.
    hair colour "red" -> "a portrait of a person with short red hair", "... with a red bob", ..."""
    v = LOOK_ATTRIBUTES
    person = "a portrait of a person"

    def wearing(colour, kind):
        return f"{person} wearing {a_or_an(f'{colour} {kind}')}"

    prompts = {
        "background_colour": lambda x: [f"{person} in front of {BACKGROUND_PHRASES[p].format(x)}"
                                        for p in v["background_pattern"]],
        "background_pattern": lambda x: [f"{person} in front of {BACKGROUND_PHRASES[x].format(c)}"
                                         for c in v["background_colour"]],
        "clothing_colour": lambda x: [wearing(x, kind) for kind in v["clothing_type"]],
        "clothing_type": lambda x: [wearing(c, x) for c in v["clothing_colour"]],
        "hairstyle": lambda x: (["a portrait of a bald person"] if x == "bald"
                                else [f"{person} with {HAIR_PHRASES[x].format(c)}" for c in v["hair_colour"]]),
        "hair_colour": lambda x: [f"{person} with {HAIR_PHRASES[s].format(x)}" for s in HAIR_PHRASES],
        "expression": lambda x: [f"{person} {EXPRESSION_PHRASES[x]}"],
        # captions say nothing of absent glasses, so "none" is the bare subject; no clothing clause, which
        # was false of most images and pulled every face to "none" (val renders: 0.46 -> 0.62)
        "glasses": lambda x: [person] if x == "none" else [f"{person} wearing {x} {g} glasses"
                                                           for g in v["glasses_colour"]],
        "glasses_colour": lambda x: [f"{person} wearing {shape} {x} glasses" for shape in ("round", "square")],
    }  # fmt: skip
    if attribute not in prompts:
        raise ValueError(f"no prompts for attribute {attribute!r}; known: {sorted(prompts)}")
    return {value: prompts[attribute](value) for value in v[attribute]}


@torch.no_grad()
def _embed_texts(model: CLIPModel, tokenizer: CLIPTokenizer, texts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):  # "longest" padding: the causal text tower ignores what trails
        tokens = tokenizer(texts[i : i + batch], padding="longest", max_length=77, truncation=True, return_tensors="pt")
        out.append(F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def embed_pixels(model: CLIPModel, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([F.normalize(model.get_image_features(pixel_values=pixels[i : i + batch]).pooler_output, dim=-1)
                      for i in range(0, len(pixels), batch)])  # fmt: skip


@torch.no_grad()
def attribute_classifiers(model: CLIPModel, tokenizer: CLIPTokenizer) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Zero-shot classifiers: per look attribute, its values and their unit text embeddings [K, D]
    (the normalised mean over each value's prompt ensemble); classify with (image @ text.T).argmax."""
    out = {}
    for attribute in LOOK_ATTRIBUTES:
        prompts = attribute_prompts(attribute)
        text = [F.normalize(_embed_texts(model, tokenizer, p).mean(0), dim=-1) for p in prompts.values()]
        out[attribute] = (list(prompts), torch.stack(text))
    return out


@torch.no_grad()
def clip_figures(model: CLIPModel, tokenizer: CLIPTokenizer, image_embeds: torch.Tensor, arrays: dict) -> dict:
    """Zero-shot attribute accuracy and retrieval R@1 from unit image embeddings [N, D] and the
    renders' ground truth (`render_arrays` output: "attributes", "captions")."""
    accuracy = {}
    for attribute, (classes, text) in attribute_classifiers(model, tokenizer).items():
        truth = [a[attribute] for a in arrays["attributes"]]
        keep = [i for i, t in enumerate(truth) if t]  # "" = not visible (bald, no glasses)
        if not keep:
            continue
        predicted = (image_embeds[keep] @ text.T).argmax(-1)
        accuracy[attribute] = float(np.mean([classes[p] == truth[i] for p, i in zip(predicted.tolist(), keep)]))
    similarity = image_embeds @ _embed_texts(model, tokenizer, arrays["captions"]).T
    target = torch.arange(len(similarity))
    return {
        "zero_shot": accuracy,
        "zero_shot_mean": float(np.mean(list(accuracy.values()))),
        "i2t_r1": float((similarity.argmax(1) == target).float().mean()),
        "t2i_r1": float((similarity.argmax(0) == target).float().mean()),
        "n_images": len(similarity),
    }



def evaluate_clip(path: str | Path, *, split: str = "test", n_per_identity: int = 2, seed: int = EVAL_SEED,
                  num_identities: int | None = None, threads: int | None = None) -> dict:
    """Zero-shot look-attribute accuracy (per attribute and mean) and image<->text retrieval R@1 on
    held-out renders, with the model, tokenizer and image processor loaded from `path`."""
    if threads:
        torch.set_num_threads(threads)
    model = CLIPModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer, processor = CLIPTokenizer.from_pretrained(path), CLIPImageProcessor.from_pretrained(path)
    arrays = split_renders(split, num_identities, n_per_identity, seed, model.config.vision_config.image_size)
    pixels = processor(images=list(arrays["images"]), return_tensors="pt").pixel_values
    return {**clip_figures(model, tokenizer, embed_pixels(model, pixels), arrays), "split": split}
