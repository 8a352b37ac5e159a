"""What personalisation costs (conditioning, hypernetwork, fusing) and what its result costs per UNet step.

    python eval/bench_personalize.py [--threads 2] [--device cpu|cuda] [--skip-sdxl]
        [--dreambooth-summary runs/eval/x/summary.json | --dreambooth-best-steps 1000]

Toy world (CPU, float32): the shipped toy models (toy face analysis, toy CLIP, toy SDXL pipeline) and a
HyperLoRA of the toy training preset (hyperlora/train/presets/toy.json) with RANDOM weights: it is untrained,
so only its timings mean something (its LoRAs have a trained one's shapes). Two 64 px test renders are
the references, as in the evaluation. Then the toy UNet's step with the LoRA fused in place and with the
runtime LoRA, as a ratio to the base step (eval/bench_lora.py's interleaved rounds; targets <= 1.01 x and
<= 1.15 x), and DreamBooth's time to its best ID similarity: its per-step time measured here with the
evaluation's own DreamBooth (eval/baselines.py, rank 4, lr 1e-3, 8 references) times the steps at which it
read best (README: 0.163 after 1,000 steps on the shipped model), or the best dreambooth row of an
eval.run summary.json when --dreambooth-summary is given.

SDXL size (--device, bfloat16): the release's configuration (preset sdxl_v1: K = 128, rank 8, 1.57 B
parameters) on the SDXL UNet's 140 attention modules, RANDOM weights; CLIP ViT-L/14 with random weights;
face analysis by dlib on two real photos, standing in for antelopev2, whose weights are not here. Then the
SDXL UNet (random weights) per step with the LoRA fused and at runtime, and personalisation against two
UNet steps at 1024 px on the same device. A 1024 px step (128 x 128 latents) on a CPU is too slow and too
large to time here, so on a CPU it is estimated: a step at --sdxl-latent timed, scaled by the ratio of the
two sizes' FLOPs (counted on the meta device). Peak memory: the process's peak RSS on a CPU, the CUDA
allocator's peak on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

from eval.bench_lora import _median_ms, _sync, fused_and_runtime_ratios
from hyperlora import HyperLoRA, find_targets, preset
from hyperlora.lora import InPlaceFusion

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "data" / "toy"
DREAMBOOTH_BEST_STEPS = 1000  # README, issue 17's check 0: 0.163 ID similarity after 1,000 steps, its best reading
ID_SCALE = 0.85  # the release's default ID-LoRA weight


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype`, so a 2.6 B-parameter UNet never exists in float32 too."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def peak_memory_gb(device: str) -> float:
    """Peak memory so far: the CUDA allocator's on a GPU, the process's resident set on a CPU (Linux: KiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, repeats: int) -> tuple[float, object]:
    """(median ms over `repeats` calls after one warm-up call, the warm-up's result)."""
    result = fn()
    return _median_ms(fn, repeats), result


def personalisation_ms(conditioner, model, unet, references, repeats: int) -> tuple[dict, dict]:
    """Median ms of conditioning, hypernetwork and fusing in place (restored after each), and the LoRAs."""
    ms = {}
    ms["conditioning"], features = timed(lambda: conditioner(references), repeats)
    kwargs = features if isinstance(features, dict) else features.generate_kwargs()
    with torch.no_grad():
        ms["hypernetwork"], loras = timed(lambda: model.generate(**kwargs), repeats)
    fusion, times = InPlaceFusion(unet), []
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync()
        start = time.perf_counter()
        fusion.fuse([loras["id"]], [ID_SCALE])
        _sync()
        times.append(time.perf_counter() - start)
        fusion.restore()
    ms["fusing"] = 1000 * statistics.median(times[1:])
    ms["total"] = ms["conditioning"] + ms["hypernetwork"] + ms["fusing"]
    return ms, loras


# ---------------------------------------------------------------------------------------------
# Toy world


def toy_world(args) -> dict:
    from hyperlora.conditioning.clip_features import ClipImageEncoder
    from hyperlora.conditioning.references import Conditioner
    from hyperlora.toy.face_backend import ToyFaceAnalyzer
    from hyperlora.toy.pipeline import load_toy_pipeline
    from hyperlora.toy.render import render_sample, split_identities
    from hyperlora.train.config import resolve
    from hyperlora.worlds.sdxl import unet_inputs

    pipe = load_toy_pipeline(TOY / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    conditioner = Conditioner(ToyFaceAnalyzer(model_dir=TOY / "faces"), ClipImageEncoder(TOY / "clip", world="toy"),
                              min_face_size=8.0)  # fmt: skip
    config = resolve("toy", 3).model
    torch.manual_seed(0)
    model = HyperLoRA(config, find_targets(pipe.unet)).randomize_up_bases(0.02).eval()
    person = split_identities("test")[0]
    references = [Image.fromarray(render_sample(person, k, seed=0).image) for k in range(2)]
    ms, loras = personalisation_ms(conditioner, model, pipe.unet, references, args.repeats)
    inputs = unet_inputs(pipe.unet, batch=2)  # classifier-free guidance: two samples per step
    inputs["encoder_hidden_states"] = torch.randn(2, 77, pipe.unet.config.cross_attention_dim)
    base_s, ratios = fused_and_runtime_ratios(pipe.unet, [loras["id"]], [ID_SCALE], inputs, args.step_repeats)
    out = {"ms": ms, "modules": len(model.targets), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "base_step_ms": 1000 * base_s, "ratios": ratios}  # fmt: skip
    out["dreambooth"] = dreambooth_time(args, pipe, person)
    out["peak_gb"] = peak_memory_gb("cpu")
    return out


def dreambooth_time(args, pipe, person: int) -> dict:
    """DreamBooth's time to its best ID similarity: from an eval.run summary, or its step time here x best steps."""
    import json

    if args.dreambooth_summary:
        rows = [r for r in json.loads(Path(args.dreambooth_summary).read_text())["rows"]
                if str(r.get("variant", "")).startswith("dreambooth@") and r.get("id_sim") is not None]  # fmt: skip
        if not rows:
            raise ValueError(f"{args.dreambooth_summary}: no dreambooth rows with an ID similarity")
        best = max(rows, key=lambda r: r["id_sim"])
        return {"ms": best["personalize_train_ms"], "how": f"{best['variant']} of {args.dreambooth_summary}, its best "
                f"ID similarity ({best['id_sim']:.3f}): the run's own training time"}  # fmt: skip
    from eval.baselines import DreamBooth
    from eval.protocol import EvalConfig
    from hyperlora.toy.render import render_sample

    steps = args.dreambooth_measure_steps
    config = EvalConfig(dreambooth_steps=str(steps))
    images = np.stack([render_sample(person, k, seed=1).image for k in range(args.dreambooth_references)])
    method = DreamBooth(config, SimpleNamespace(pipe=pipe))
    variants = method.variants({"id": int(person), "images": images})
    with torch.no_grad():  # as in the protocol: DreamBooth turns gradients on for its own steps only
        _, timing, _ = next(variants)
    variants.close()  # removes the adapter
    per_step = timing["train_ms"] / steps
    return {"ms": per_step * args.dreambooth_best_steps, "step_ms": per_step,
            "how": f"{per_step:.0f} ms per step (measured over {steps} steps, {args.dreambooth_references} "
                   f"references) x {args.dreambooth_best_steps} steps, where it read its best ID similarity "
                   "(README, issue 17: 0.163 on the shipped model); not a run to convergence"}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# SDXL size


class VisionTower:
    """CLIP ViT-L/14's shape with random weights, called as `ClipImageEncoder` is: images -> hidden_states[-2]."""

    hidden_size = 1024

    def __init__(self, device: str, dtype: torch.dtype):
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

        config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                  num_hidden_layers=24, patch_size=14, image_size=224, projection_dim=768)  # fmt: skip
        with default_dtype(dtype), torch.device(device):
            self.model = CLIPVisionModelWithProjection(config).eval()
        self.processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        out = self.model(pixel_values=pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2]


def sample_photos() -> list[Image.Image]:
    """Two real portraits shipped with matplotlib and scikit-image (as in the conditioning tests)."""
    import matplotlib
    import skimage

    from hyperlora.conditioning import load_image

    return [load_image(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"),
            load_image(Path(skimage.__file__).parent / "data" / "astronaut.png")]  # fmt: skip


def unet_tflops(latent: int) -> float:
    """TFLOPs of one SDXL UNet call at batch 2 (CFG), 77 text tokens, latent x latent, counted on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    from hyperlora.worlds.sdxl import build_unet

    unet = build_unet("sdxl", device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**step_inputs(unet, latent, "meta", torch.float32))
    return counter.get_total_flops() / 1e12


def step_inputs(unet, latent: int, device: str, dtype: torch.dtype) -> dict:
    """One guided step's UNet inputs at latent x latent (8 x that in pixels)."""
    time_dim = unet.config.addition_time_embed_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * time_dim
    size = 8 * latent
    with torch.device(device):
        return {"sample": torch.randn(2, 4, latent, latent, dtype=dtype), "timestep": torch.tensor(500),
                "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, dtype=dtype),
                "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, dtype=dtype),
                                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype)}}  # fmt: skip


def sdxl_size(args) -> dict:
    from hyperlora.conditioning import DlibAnalyzer
    from hyperlora.conditioning.references import Conditioner
    from hyperlora.worlds.sdxl import build_unet

    device, dtype = args.device, getattr(torch, args.dtype)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    targets = find_targets(build_unet("sdxl", device="meta"))
    with default_dtype(dtype), torch.device(device):
        model = HyperLoRA(preset("sdxl_v1"), targets).eval()
    tower, photos = VisionTower(device, dtype), sample_photos()
    conditioner = Conditioner(DlibAnalyzer(), tower, pick="best") if args.sdxl_faces == "dlib" else None

    def condition(references):  # dlib gives 128-d identities; the release's antelopev2 512-d: its shape stands in
        clip = conditioner(references).clip if conditioner else tower(references)  # faces, crops, CLIP / CLIP alone
        arcface = torch.nn.functional.normalize(torch.randn(len(references), 512), dim=-1).to(device, dtype)
        return {"arcface": arcface, "clip": clip, "num_refs": len(references)}

    with default_dtype(dtype):
        unet = build_unet("sdxl", device=device).requires_grad_(False)
    ms, loras = personalisation_ms(condition, model, unet, photos, args.repeats)
    out = {"ms": ms, "params_B": sum(p.numel() for p in model.parameters()) / 1e9}
    del model  # its 1.57 B parameters are not needed for the steps
    latent = args.sdxl_latent or (128 if device.startswith("cuda") else 32)
    inputs = step_inputs(unet, latent, device, dtype)
    base_s, out["ratios"] = fused_and_runtime_ratios(unet, [loras["id"]], [ID_SCALE], inputs, args.sdxl_repeats)
    out["latent"], out["step_s"] = latent, base_s
    if latent == 128:
        out["step_1024_s"], out["step_1024_how"] = base_s, "timed"
    else:
        scale = unet_tflops(128) / unet_tflops(latent)
        out["step_1024_s"] = base_s * scale
        out["step_1024_how"] = (f"ESTIMATED: a step at {8 * latent} px ({base_s:.1f} s) x {scale:.1f}, the FLOP ratio "
                                "of 1024 px to it")  # fmt: skip
    out["peak_gb"] = peak_memory_gb(device)
    return out


# ---------------------------------------------------------------------------------------------


def report_personalisation(ms: dict) -> None:
    for key in ("conditioning", "hypernetwork", "fusing", "total"):
        print(f"  {key:<13} {ms[key]:10.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed personalisations (medians)")
    parser.add_argument("--step-repeats", type=int, default=30, help="interleaved rounds of toy UNet steps")
    parser.add_argument("--device", default="cpu", help="for the SDXL-size part (the toy world runs on the CPU)")
    parser.add_argument("--dtype", default="bfloat16", help="of the SDXL-size part")
    parser.add_argument("--sdxl-latent", type=int, default=0, help="latent side of the timed SDXL steps "
                        "(default: 128 = 1024 px on a GPU, 32 on a CPU, scaled to 1024 px by FLOPs)")  # fmt: skip
    parser.add_argument("--sdxl-repeats", type=int, default=2, help="interleaved rounds of SDXL UNet steps")
    parser.add_argument("--sdxl-faces", choices=["dlib", "none"], default="dlib", help="face analysis in the "
                        "SDXL-size conditioning: dlib (antelopev2 stand-in) or none (CLIP alone)")  # fmt: skip
    parser.add_argument("--skip-toy", action="store_true")
    parser.add_argument("--skip-sdxl", action="store_true")
    parser.add_argument("--dreambooth-summary", default="", help="an eval.run summary.json with dreambooth rows")
    parser.add_argument("--dreambooth-best-steps", type=int, default=DREAMBOOTH_BEST_STEPS)
    parser.add_argument("--dreambooth-measure-steps", type=int, default=10)
    parser.add_argument("--dreambooth-references", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()  # the pipeline's loading bars
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # insightface's norm_crop deprecation, once per call
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} CPU threads; medians of {args.repeats} personalisations")
    if not args.skip_toy:
        r = toy_world(args)
        print(f"\nToy world (CPU, float32), 2 references of 64 px, HyperLoRA toy preset: {r['modules']} modules, "
              f"{r['params_M']:.1f} M parameters, RANDOM weights (UNTRAINED: timings only)")  # fmt: skip
        report_personalisation(r["ms"])
        print(f"  toy UNet step (batch 2): {r['base_step_ms']:.1f} ms; per step, as a ratio to it:")
        print(f"    LoRA fused in place    {r['ratios']['fused in place']:6.3f} x   (target <= 1.01)")
        print(f"    runtime LoRA (hooks)   {r['ratios']['runtime (hooks)']:6.3f} x   (target <= 1.15)")
        db = r["dreambooth"]
        print(f"  DreamBooth to its best ID similarity: {db['ms'] / 1000:.0f} s ({db['how']})")
        print(f"    HyperLoRA personalisation is {db['ms'] / r['ms']['total']:.0f} x faster")
        print(f"  peak memory (process RSS so far): {r['peak_gb']:.2f} GB")
    if not args.skip_sdxl:
        r = sdxl_size(args)
        faces = ("dlib, standing in for antelopev2 (its weights are absent)" if args.sdxl_faces == "dlib" else
                 "NONE (CLIP alone: conditioning leaves out face analysis)")  # fmt: skip
        print(f"\nSDXL size ({args.device}, {args.dtype}), HyperLoRA sdxl_v1: {r['params_B']:.2f} B parameters, RANDOM "
              f"weights; CLIP ViT-L/14 random; face analysis: {faces}")  # fmt: skip
        report_personalisation(r["ms"])
        print(f"  SDXL UNet step at {8 * r['latent']} px (batch 2): {r['step_s']:.2f} s; per step, as a ratio to it:")
        print(f"    LoRA fused in place    {r['ratios']['fused in place']:6.3f} x   (target <= 1.01)")
        print(f"    runtime LoRA (hooks)   {r['ratios']['runtime (hooks)']:6.3f} x   (target <= 1.15)")
        two_steps = 2 * r["step_1024_s"]
        print(f"  two SDXL UNet steps at 1024 px: {two_steps:.1f} s ({r['step_1024_how']})")
        print(f"    personalisation / two steps = {r['ms']['total'] / 1000 / two_steps:.2f}   (target <= 1)")
        print(f"  peak memory ({'CUDA allocator' if args.device.startswith('cuda') else 'process RSS'}): "
              f"{r['peak_gb']:.2f} GB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
