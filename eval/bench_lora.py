"""Per-step UNet cost of a generated LoRA, and the time from coefficients to a fused UNet.

    python eval/bench_lora.py [--unets tiny mid] [--repeats 30] [--threads 2]

For each UNet (random weights: timing only) it measures one UNet call at batch 2 (classifier-free
guidance) for: the base UNet; the runtime LoRA (`functional_lora` hooks); diffusers adapters
(PEFT, unfused); diffusers `fuse_lora` with the adapters kept (unfuse-able); fused then
`unload_lora` (plain weights, no way back); and `InPlaceFusion` (plain weights, exact restore). Variants are timed in interleaved rounds and reported as
the median ratio to the base time of the same round. Targets: fused <= 1.01 x, runtime <= 1.15 x.

It also counts FLOPs (torch's FlopCounterMode; the SDXL UNet on the meta device at 1024 px, CFG
batch 2, 77 text tokens): the share a rank-8 ID + rank-4 Base runtime LoRA adds to a UNet step,
which bounds what the runtime path can cost on hardware where FLOPs dominate.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from hyperlora import HyperLoRA, find_targets, functional_lora, load_into_diffusers, preset
from hyperlora.lora import InPlaceFusion
from hyperlora.config import TOKENS_PER_MODULE
from hyperlora.resampler import normalize_coefficients
from hyperlora.targets import LAYER_KEYS
from hyperlora.worlds.sdxl import build_unet, unet_inputs


def lora_flop_share(name: str, rank_total: int = 12) -> tuple[float, float]:
    """(UNet TFLOPs per step, extra FLOPs of a runtime LoRA as a share of them), counted on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(name, device="meta")
    size, time_dim = unet.config.sample_size, unet.config.addition_time_embed_dim
    inputs = dict(
        sample=torch.empty(2, 4, size, size, device="meta"),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.empty(2, 77, unet.config.cross_attention_dim, device="meta"),
        added_cond_kwargs=dict(
            text_embeds=torch.empty(2, unet.config.projection_class_embeddings_input_dim - 6 * time_dim, device="meta"),
            time_ids=torch.empty(2, 6, device="meta"),
        ),
    )
    modules, tokens = dict(unet.named_modules()), {}
    targets = find_targets(unet)
    for target in targets:
        for key in LAYER_KEYS:
            path = target.linear_path(key)
            modules[path].register_forward_hook(lambda m, i, o, p=path: tokens.__setitem__(p, i[0].shape[:-1].numel()))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**inputs)
    total = counter.get_total_flops()
    lora = sum(2 * tokens[t.linear_path(k)] * rank_total * (t.in_features(k) + t.out_features(k)) for t in targets for k in LAYER_KEYS)
    return total / 1e12, lora / total


def _sync() -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _time(fn, inputs) -> float:
    _sync()
    start = time.perf_counter()
    with torch.no_grad():
        fn(**inputs)
    _sync()
    return time.perf_counter() - start


def fused_and_runtime_ratios(unet, loras: list, scales: list, inputs: dict, repeats: int) -> tuple[float, dict]:
    """(median seconds of a base UNet call, {variant: median ratio to the base call of the same round}) for the
    runtime LoRA (`functional_lora` hooks) and the LoRA fused in place (`InPlaceFusion`, restored every round)."""
    fusion = InPlaceFusion(unet)

    def runtime(**kw):
        with functional_lora(unet, loras, scales):
            return unet(**kw)

    for fn in (unet, runtime):  # warm-up
        _time(fn, inputs)
    base_times, ratios = [], {"runtime (hooks)": [], "fused in place": []}
    for _ in range(repeats):
        base_times.append(_time(unet, inputs))
        ratios["runtime (hooks)"].append(_time(runtime, inputs) / base_times[-1])
        fusion.fuse(loras, scales)
        try:
            ratios["fused in place"].append(_time(unet, inputs) / base_times[-1])
        finally:
            fusion.restore()
    return statistics.median(base_times), {k: statistics.median(v) for k, v in ratios.items()}


def bench_unet(name: str, repeats: int) -> dict:
    unet = build_unet(name).requires_grad_(False)
    targets = find_targets(unet)
    config = preset("sdxl_v1" if name == "sdxl" else "tiny", hyper_dim=128, rank=8, has_base_lora=True)
    model = HyperLoRA(config, targets).randomize_up_bases(0.02)
    coefficients = normalize_coefficients(torch.randn(1, TOKENS_PER_MODULE * len(targets), config.hyper_dim))
    inputs = unet_inputs(unet, batch=2)

    def assemble():
        with torch.no_grad():
            return {"id": model.assemble(coefficients, "id"), "base": model.assemble(coefficients, "base")}

    loras = assemble()
    assemble_ms = _median_ms(assemble)
    adapters = copy.deepcopy(unet)
    load_into_diffusers(adapters, loras, {"id": 0.85, "base": 0.25})
    fused = copy.deepcopy(unet)
    fuse_ms = _median_ms(lambda: (fused.unfuse_lora(), load_into_diffusers(fused, loras, {"id": 0.85, "base": 0.25}, fuse=True)))
    in_place = copy.deepcopy(unet)
    fusion = InPlaceFusion(in_place)
    in_place_ms = _median_ms(lambda: fusion.fuse([loras["id"], loras["base"]], [0.85, 0.25]))
    plain = copy.deepcopy(fused)
    plain.unload_lora()  # keeps the fused weights, drops the PEFT wrappers

    def runtime(**kw):
        with functional_lora(unet, [loras["id"], loras["base"]], [0.85, 0.25]):
            return unet(**kw)

    variants = {"base": unet, "runtime (hooks)": runtime, "adapters (PEFT)": adapters,
                "fused, adapters kept": fused, "fused + unloaded": plain,
                "fused in place": in_place}  # fmt: skip
    for fn in variants.values():  # warm-up
        _time(fn, inputs)
    ratios = {k: [] for k in variants}
    base_times = []
    for _ in range(repeats):
        base = _time(unet, inputs)
        base_times.append(base)
        for key, fn in variants.items():
            ratios[key].append(_time(fn, inputs) / base)
    return {
        "unet": name,
        "modules": len(targets),
        "unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
        "base_ms": 1000 * statistics.median(base_times),
        "ratios": {k: statistics.median(v) for k, v in ratios.items()},
        "coefficients_to_lora_ms": assemble_ms,
        "lora_to_fused_unet_ms": fuse_ms,
        "lora_to_in_place_ms": in_place_ms,
    }


def bench_sdxl(latent: int, repeats: int) -> dict:
    """The real SDXL UNet architecture (random weights) at a small latent size: base, runtime, fused.

    The hypernetwork's 1.5 B-parameter basis is not built: random rank-8 ID and rank-4 Base LoRAs of
    the generated shapes stand in for its output, which is all the per-step cost depends on.
    """
    from hyperlora.lora import LoRAWeights

    torch.manual_seed(0)
    config = dict(build_unet("sdxl", device="meta").config)
    config["sample_size"] = latent
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(config).eval().requires_grad_(False)
    targets = find_targets(unet)
    loras = {}
    for branch, rank in (("id", 8), ("base", 4)):
        layers = {t.linear_path(k): (torch.randn(1, rank, t.in_features(k)) * 0.01, torch.randn(1, t.out_features(k), rank) * 0.01)
                  for t in targets for k in LAYER_KEYS}  # fmt: skip
        loras[branch] = LoRAWeights(layers, rank, rank / 2)
    inputs = unet_inputs(unet, batch=2)
    inputs["encoder_hidden_states"] = torch.randn(2, 77, 2048)
    fusion = InPlaceFusion(unet)
    fuse_ms = _median_ms(lambda: fusion.fuse([loras["id"], loras["base"]], [0.85, 0.25]), repeats=1)
    fusion.restore()
    base_s, ratios = fused_and_runtime_ratios(unet, [loras["id"], loras["base"]], [0.85, 0.25], inputs, repeats)
    return {"base_s": base_s, "ratios": ratios, "lora_to_in_place_ms": fuse_ms, "modules": len(targets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sdxl-latent", type=int, default=0, help="also time the SDXL architecture at this latent size (10 GB RAM)")
    parser.add_argument("--sdxl-repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch 2, K=128, rank 8 (+ Base rank 4)")
    for name in args.unets:
        r = bench_unet(name, args.repeats)
        print(f"\n{name} UNet: {r['modules']} modules, {r['unet_params_M']:.1f} M params, base step {r['base_ms']:.1f} ms")
        for key, ratio in r["ratios"].items():
            print(f"  {key:<22} {ratio:6.3f} x base")
        print(f"  coefficients -> LoRA matrices   {r['coefficients_to_lora_ms']:8.1f} ms")
        print(f"  LoRA -> fused UNet (diffusers)  {r['lora_to_fused_unet_ms']:8.1f} ms")
        print(f"  LoRA -> fused UNet (in place)   {r['lora_to_in_place_ms']:8.1f} ms")
    if args.sdxl_latent:
        r = bench_sdxl(args.sdxl_latent, args.sdxl_repeats)
        print(f"\nsdxl UNet (random weights), {r['modules']} modules, latents {args.sdxl_latent}x{args.sdxl_latent}: base step {r['base_s']:.1f} s")
        for key, ratio in r["ratios"].items():
            print(f"  {key:<22} {ratio:6.3f} x base")
        print(f"  LoRA -> fused UNet (in place)   {r['lora_to_in_place_ms']:8.1f} ms")
    print("\nFLOPs of one UNet step (batch 2, 77 text tokens) and the share a runtime LoRA (rank 8 + 4) adds:")
    for name in ["tiny", "mid", "sdxl"]:
        tflops, share = lora_flop_share(name)
        print(f"  {name:<5} {tflops:10.4f} TFLOPs   runtime LoRA +{share:.2%}")


if __name__ == "__main__":
    main()
