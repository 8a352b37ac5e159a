"""The methods the protocol scores, in one table: HyperLoRA and its floor, ceiling and tuning baseline.

- `hyperlora`: the hypernetwork predicts a LoRA from the references, fused once per identity
  (a checkpoint folder, or a freshly initialised and therefore UNTRAINED one: zero up bases, so its
  LoRA is zero and it scores as the base model with trigger words).
- `base`: the base model without personalisation, the same seeds: the floor.
- `renders`: the world's real images of the identity, scored as if generated: the ceiling for ID
  similarity (what a perfect generator of this person would get). Toy: renders with the prompt's
  look; sdxl: the identity's held-out photos (`world.real_images`).
- `dreambooth`: a per-identity LoRA (peft, `unet.add_adapter(LoraConfig(...))` as diffusers'
  DreamBooth-LoRA script) fine-tuned on the references with a rare token, scored at several
  cumulative step counts with the wall time each took, so fidelity against time sits beside
  HyperLoRA's personalisation time.
- `hyperlora_ft`: HyperLoRA's generated ID LoRA fine-tuned on the references with the diffusion loss
  (hyperlora/finetune.py: the official README's "a good start for a short fine-tune"), at the same cumulative
  step counts; its time includes the personalisation. `zero_ft`: the same recipe (rank, targets, trigger words,
  lr, noise) from a PEFT-initialised LoRA, so the two differ only in the start.

A method yields `(variant, timings, generate)` per identity from `variants(identity)`;
`generate(prompt, seeds) -> uint8 [N, H, W, 3]`, or None for "the no-LoRA images themselves".
Whatever a method loads into the shared pipeline it removes when its variants are exhausted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from .protocol import EvalConfig, eval_seed

logger = logging.getLogger(__name__)

DREAMBOOTH_TOKEN = "sks"  # the rare token of diffusers' DreamBooth examples
DREAMBOOTH_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the same attention linears HyperLoRA targets
ADAPTER = "dreambooth"


class Method:
    """What the protocol needs from a method."""

    name = ""
    compares_to_base = True  # score disruption / non-face preservation against the no-LoRA images
    plumbing_only = False  # its own weights make the numbers plumbing (e.g. an untrained HyperLoRA)
    source = "generated"  # what its images are: "generated" by the pipeline, or "render" (ground truth)
    label = ""

    def variants(self, identity: dict) -> Iterator[tuple[str, dict, object]]:
        raise NotImplementedError


class BaseModel(Method):
    name, label = "base", "base model, no personalisation (floor)"

    def __init__(self, config: EvalConfig, world):
        pass

    def variants(self, identity):
        yield "base", {"total_ms": 0.0}, None


class Renders(Method):
    name, compares_to_base = "renders", False

    def __init__(self, config: EvalConfig, world):
        self.world, self.label, self.source = world, world.ceiling_label, world.ceiling_source

    def variants(self, identity):
        def generate(prompt, seeds):
            return self.world.real_images(identity, prompt, seeds)

        yield "renders", {"total_ms": 0.0}, generate


class HyperLoRAMethod(Method):
    name = "hyperlora"

    def __init__(self, config: EvalConfig, world):
        from hyperlora import HyperLoRA, find_targets, preset
        from hyperlora.checkpoint import load_checkpoint
        from hyperlora.conditioning.backends import make_face_analyzer
        from hyperlora.conditioning.clip_features import ClipImageEncoder
        from hyperlora.conditioning.references import Conditioner
        from hyperlora.pipeline import PersonalizedPipeline
        from hyperlora.worlds import checkpoint_note

        self.config = config
        analyzer = make_face_analyzer(config.face_backend, **world.backend_kwargs(config.face_backend))
        device, dtype = config.device, config.torch_dtype
        clip = ClipImageEncoder(world.clip_dir, world=world.world, device=device, dtype=dtype)
        if config.checkpoint:
            model = load_checkpoint(config.checkpoint, unet=world.pipe.unet, dtype=dtype, device=device)
            note = checkpoint_note(Path(config.checkpoint))  # e.g. "UNTRAINED random init: ..."
            self.label = f"hyperlora checkpoint {config.checkpoint}" + (f" ({note})" if note else "")
            self.plumbing_only = "UNTRAINED" in note
        else:
            torch.manual_seed(config.seed)
            model_config = preset("tiny", dim=clip.hidden_size, id_embed_dim=analyzer.embedding_dim,
                                  has_base_lora=config.base_scale > 0)  # fmt: skip
            model = HyperLoRA(model_config, find_targets(world.pipe.unet)).eval().to(device, dtype)
            self.label, self.plumbing_only = "hyperlora UNTRAINED (fresh init, no checkpoint): NOT a result", True
            logger.warning("*** no HyperLoRA checkpoint: evaluating a freshly initialised, UNTRAINED hypernetwork ***")
        with_base = config.base_scale > 0 and model.config.has_base_lora
        conditioner = Conditioner(analyzer, clip, with_base=with_base, min_face_size=config.min_face_size)
        self.personalized = PersonalizedPipeline(world.pipe, model, conditioner)
        self.world = world

    def variants(self, identity):
        from hyperlora.conditioning.references import NoUsableReferenceError
        from hyperlora.pipeline import with_trigger

        # sdxl: the photo files (the conditioner finds and crops the face at full resolution); toy: the renders
        images = identity.get("photos") or [Image.fromarray(image) for image in identity["images"]]
        try:
            c = self.config
            result = self.personalized.personalize(images, id_scale=c.id_scale, base_scale=c.base_scale)
            timings = {f"{k}_ms": v for k, v in result.timings_ms.items()} | {"failed": False}
        except NoUsableReferenceError as err:  # scored as the base model with trigger words; counted in the summary
            logger.warning("identity %s: personalisation failed (%s)", identity["id"], err)
            timings = {"total_ms": float("nan"), "failed": True}
        trigger = self.personalized.trigger_words

        def generate(prompt, seeds):  # the LoRA is fused into the shared pipeline's UNet
            return self.world.generate(with_trigger(prompt.text, trigger), seeds)

        try:
            yield "hyperlora", timings, generate
        finally:
            self.personalized.reset()


def remove_adapter(unet, name: str) -> None:
    """Delete a peft adapter and, when it was the last, peft's wrappers too: the UNet's linears are plain
    nn.Linear again, as `functional_lora` and the fusers of the methods after it need them."""
    unet.delete_adapters(name)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()


class DreamBooth(Method):
    name = "dreambooth"
    label = "dreambooth LoRA fine-tuned per identity on the references (tuning baseline)"

    def __init__(self, config: EvalConfig, world):
        self.config, self.world, self.counts = config, world, config.step_counts()

    def _data(self, identity: dict) -> dict:
        """The references as scaled VAE latents and the instance prompt's text states (frozen parts, once)."""
        from hyperlora.finetune import reference_batch

        instance = f"{DREAMBOOTH_TOKEN}, a portrait of a person"  # DreamBooth's "a [V] [class]" prompt
        return reference_batch(self.world.pipe, list(identity["images"]), instance, self.config.size)

    def variants(self, identity):
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from hyperlora.diffusion import diffusion_loss

        unet, c = self.world.pipe.unet, self.config
        torch.manual_seed(eval_seed(c.seed, identity["id"], 1))  # the LoRA's initialisation
        unet.add_adapter(LoraConfig(r=c.dreambooth_rank, lora_alpha=c.dreambooth_rank, init_lora_weights="gaussian",
                                    target_modules=DREAMBOOTH_TARGETS), adapter_name=ADAPTER)  # fmt: skip
        try:
            start = time.perf_counter()
            batch = self._data(identity)
            params = [p for name, p in unet.named_parameters() if "lora" in name]
            for p in params:  # the LoRA trains in float32 under a half-precision UNet (peft casts at the boundary)
                p.data = p.data.float()
            optimizer = torch.optim.AdamW(params, lr=c.dreambooth_lr)
            # the pipeline's own noise schedule and prediction type (the toy UNet predicts v, SDXL epsilon)
            scheduler = DDPMScheduler.from_config(self.world.pipe.scheduler.config)
            generator = torch.Generator().manual_seed(eval_seed(c.seed, identity["id"], 2))  # noise and timesteps
            elapsed, done = time.perf_counter() - start, 0
            for count in self.counts:
                start = time.perf_counter()
                with torch.enable_grad():
                    for p in params:
                        p.requires_grad_(True)
                    for _ in range(count - done):
                        loss = diffusion_loss(unet, scheduler, batch, generator, None)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    for p in params:
                        p.requires_grad_(False)
                elapsed, done = elapsed + time.perf_counter() - start, count
                timings = {"train_ms": 1000 * elapsed, "dreambooth_steps": count, "final_loss": float(loss)}
                yield f"dreambooth@{count}", timings, self._generate
        finally:
            remove_adapter(unet, ADAPTER)

    def _generate(self, prompt, seeds):
        return self.world.generate(f"{DREAMBOOTH_TOKEN}, {prompt.text}", seeds)


class HyperLoRAFineTune(HyperLoRAMethod):
    """HyperLoRA's ID LoRA as the start of a fine-tune on the references (hyperlora/finetune.py), scored at the
    DreamBooth step counts; the wall time is cumulative and includes the personalisation."""

    name = "hyperlora_ft"
    init = "hyperlora"

    def __init__(self, config: EvalConfig, world):
        super().__init__(config, world)
        self.counts = config.step_counts()
        self.label += f"; its ID LoRA fine-tuned on the references (hyperlora/finetune.py, lr {config.finetune_lr})"

    def _start(self, identity: dict):
        """(the LoRA to tune, the fixed LoRAs beside it as (LoRA, scale), personalisation timings); None if failed."""
        from hyperlora.conditioning.references import NoUsableReferenceError

        images = identity.get("photos") or [Image.fromarray(image) for image in identity["images"]]
        try:
            result = self.personalized.personalize(images, id_scale=self.config.id_scale,
                                                   base_scale=self.config.base_scale)  # fmt: skip
        except NoUsableReferenceError as err:  # scored as the base model with trigger words; counted in the summary
            logger.warning("identity %s: personalisation failed (%s)", identity["id"], err)
            return None
        self.personalized.reset()  # training adds the LoRA through hooks, on the base weights
        self.personalization = result
        fixed = [(result.loras[b], s) for b, s in result.scales.items() if b != "id" and s]
        return result.loras["id"], fixed, {f"{k}_ms": v for k, v in result.timings_ms.items()}

    def _tuner(self, batch: dict, start, config, fixed):
        """The fine-tuner of `start` (what `_start` returned first)."""
        from hyperlora.finetune import LoRAFinetuner, noise_scheduler, start_lora

        pipe = self.world.pipe
        return LoRAFinetuner(pipe.unet, noise_scheduler(pipe), batch, start_lora(config, start), config, fixed=fixed)

    def variants(self, identity):
        from hyperlora.finetune import INSTANCE_PROMPT, FinetuneConfig, reference_batch
        from hyperlora.pipeline import with_trigger

        c, pipe, fusion = self.config, self.world.pipe, self.personalized.fusion
        trigger = self.personalized.trigger_words

        def generate(prompt, seeds):  # the tuned LoRA is fused into the shared pipeline's UNet
            return self.world.generate(with_trigger(prompt.text, trigger), seeds)

        try:
            started = self._start(identity)
            if started is None:
                for count in self.counts:
                    yield f"{self.name}@{count}", {"total_ms": float("nan"), "failed": True, "dreambooth_steps": count,
                                                   "final_loss": float("nan")}, generate  # fmt: skip
                return
            lora, fixed, personalization_ms = started
            start = time.perf_counter()
            batch = reference_batch(pipe, list(identity["images"]), with_trigger(INSTANCE_PROMPT, trigger), c.size)
            config = FinetuneConfig(lr=c.finetune_lr, seed=eval_seed(c.seed, identity["id"], 2), init=self.init,
                                    scale=c.id_scale)  # fmt: skip
            tuner = self._tuner(batch, lora, config, fixed)
            elapsed, done = time.perf_counter() - start, 0
            for count in self.counts:
                start = time.perf_counter()
                fusion.restore()
                tuner.train(count - done, progress=False)
                fusion.fuse([tuner.lora, *(f for f, _ in fixed)], [c.id_scale, *(s for _, s in fixed)])
                elapsed, done = elapsed + time.perf_counter() - start, count
                total = personalization_ms.get("total_ms", 0.0) + 1000 * elapsed
                timings = {**personalization_ms, "train_ms": 1000 * elapsed, "total_ms": total, "failed": False,
                           "dreambooth_steps": count, "final_loss": tuner.losses[-1]}  # fmt: skip
                yield f"{self.name}@{count}", timings, generate
        finally:
            self.personalized.reset()


class ZeroFineTune(HyperLoRAFineTune):
    """The same fine-tune from a PEFT-initialised LoRA of HyperLoRA's rank and targets: only the start differs."""

    name, init = "zero_ft", "zero"

    def __init__(self, config: EvalConfig, world):
        super().__init__(config, world)
        self.plumbing_only = False  # the hypernetwork only names the targets, the rank and the trigger words
        rank = self.personalized.hyperlora.config.rank
        self.label = (f"LoRA (rank {rank}) from zero (PEFT init) fine-tuned on the references with the trigger words "
                      f"(hyperlora/finetune.py, lr {config.finetune_lr}): the same recipe as hyperlora_ft")  # fmt: skip

    def _start(self, identity: dict):
        from hyperlora.config import HyperLoRAConfig
        from hyperlora.finetune import zero_lora
        from hyperlora.targets import LAYER_KEYS

        model = self.personalized.hyperlora
        shapes = {t.linear_path(k): (t.in_features(k), t.out_features(k)) for t in model.targets for k in LAYER_KEYS}
        rank = model.config.rank
        template = zero_lora(shapes, rank, HyperLoRAConfig.alpha(rank)).to(self.config.device, torch.float32)
        return template, [], {}


class CoefficientFineTune(HyperLoRAFineTune):
    """The same fine-tune, but of HyperLoRA's ID coefficient tokens over its frozen basis banks
    (hyperlora/coefficient_tune.py): the best ID-LoRA the trained bases can make for the person, which tells a
    resampler that maps badly (this scores high, `hyperlora` low) from bases that cannot express the person."""

    name = "coef_ft"

    def __init__(self, config: EvalConfig, world):
        super().__init__(config, world)
        self.label = self.label.replace("its ID LoRA fine-tuned", "its ID coefficients (bases frozen) fine-tuned")

    def _start(self, identity: dict):
        started = super()._start(identity)
        if started is None:
            return None
        from hyperlora.coefficient_tune import id_coefficients

        _, fixed, timings = started
        return id_coefficients(self.personalized.hyperlora, self.personalization.features), fixed, timings

    def _tuner(self, batch: dict, start, config, fixed):
        from hyperlora.coefficient_tune import CoefficientFinetuner
        from hyperlora.finetune import noise_scheduler

        pipe = self.world.pipe
        return CoefficientFinetuner(pipe.unet, noise_scheduler(pipe), batch, self.personalized.hyperlora, start, config,
                                    fixed=fixed)  # fmt: skip


class CoefficientRows(HyperLoRAMethod):
    """HyperLoRA's ID-LoRA from coefficient rows fitted per training person (`python -m eval.coefficient_targets
    fit`) instead of the resampler's, over the same bases: do the rows carry the person? Scores only people the
    table holds (`--split train`); the Base-LoRA, when on, is the references' as in `hyperlora`."""

    name = "coef_rows"

    def __init__(self, config: EvalConfig, world):
        if not config.coefficient_table:
            raise ValueError("method coef_rows needs --coefficient-table: fit folders of eval.coefficient_targets")
        super().__init__(config, world)
        from .coefficient_targets import load_tables

        people, tokens, _ = load_tables(config.coefficient_table.split(","))
        self.rows = dict(zip(people.tolist(), tokens))
        self.label += f"; ID coefficients: the rows fitted per person in {config.coefficient_table}"

    def variants(self, identity):
        if identity["id"] not in self.rows:
            raise ValueError(f"coef_rows: person {identity['id']} has no row in {self.config.coefficient_table} "
                             f"(it holds {len(self.rows)} training people): score the people the fit covered")  # fmt: skip
        for _, timings, generate in super().variants(identity):
            if not timings["failed"]:
                result, c = self.personalized.current, self.config
                row = self.rows[identity["id"]][None].to(c.device, c.torch_dtype)
                fixed = [(result.loras[b], s) for b, s in result.scales.items() if b != "id" and s]
                self.personalized.fusion.restore()
                self.personalized.fusion.fuse([self.personalized.hyperlora.assemble(row, "id"), *(f for f, _ in fixed)],
                                              [c.id_scale, *(s for _, s in fixed)])  # fmt: skip
            yield "coef_rows", timings, generate


class OtherReference(HyperLoRAMethod):
    """The control of issue 17's figure 2: HyperLoRA personalised from ANOTHER held-out person's references (the
    next one), scored against this person. A LoRA that carries the person scores clearly lower here than
    `hyperlora`; a generic LoRA (the same change for everyone) scores the same."""

    name = "hyperlora_other"

    def __init__(self, config: EvalConfig, world):
        if config.num_identities < 2:
            raise ValueError("method hyperlora_other personalises from another person: it needs --num-identities >= 2")
        super().__init__(config, world)
        self.label = f"{self.label}, personalised from the NEXT person's references (control)"

    def variants(self, identity):
        other = self.world.identity((identity["index"] + 1) % self.config.num_identities)
        for _, timings, generate in super().variants(other):
            yield "hyperlora_other", timings | {"reference_identity": other["id"]}, generate


class NoTrigger(HyperLoRAMethod):
    """Issue 17's figure 4: HyperLoRA personalised from the person's references as `hyperlora`, but prompted
    WITHOUT the trigger words. Stage 2-3's cases (b) and (c) train the ID-LoRA to change nothing then, so its
    images should stay close to the base model's on the same seeds (`pixel_change`, `clip_i_disruption`), where
    `hyperlora`'s (with the trigger words) change."""

    name = "hyperlora_no_trigger"

    def __init__(self, config: EvalConfig, world):
        super().__init__(config, world)
        self.label = f"{self.label}, prompted WITHOUT the trigger words"

    def variants(self, identity):
        for _, timings, _ in super().variants(identity):
            yield "hyperlora_no_trigger", timings, lambda prompt, seeds: self.world.generate(prompt.text, seeds)


METHOD_CLASSES = {"hyperlora": HyperLoRAMethod, "hyperlora_other": OtherReference, "hyperlora_no_trigger": NoTrigger,
                  "base": BaseModel, "renders": Renders,
                  "dreambooth": DreamBooth, "hyperlora_ft": HyperLoRAFineTune, "zero_ft": ZeroFineTune,
                  "coef_ft": CoefficientFineTune, "coef_rows": CoefficientRows}  # fmt: skip


def make_method(name: str, config: EvalConfig, world) -> Method:
    if name not in METHOD_CLASSES:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHOD_CLASSES)}")
    return METHOD_CLASSES[name](config, world)
