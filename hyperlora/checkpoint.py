"""The official four-file checkpoint format, read and written (facts §1.6).

A checkpoint folder (e.g. `sdxl_hyper_id_lora_v1_fidelity/`) holds
    hyper_lora_modules.json         ordered {kohya module name: {hidden_size, cross_attention_dim}}
    hyper_lora_modules.safetensors  `{i}.{to_q,to_k,to_v,to_out}.{id,base}_{down,up}_basis`, i in JSON order
    resampler.safetensors           the ID resampler
    id_projector.safetensors        `0.weight`, `0.bias`, `2.weight`, `2.bias`
    base_resampler.safetensors      only with a Base-LoRA (not in the release)
    config.json                     ours only: the HyperLoRAConfig (official folders are inferred) and, where
                                    measured, the ID-LoRA weight to use it at (`recommended_id_weight`)
Module order is taken from the JSON, never assumed; names may be diffusers-path or ldm-path
kohya names. Every mismatch raises `CheckpointError` naming the file, key and both shapes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import HyperLoRAConfig
from .hypernet import HyperLoRA
from .targets import TargetModule, find_targets, resolve_module_name

MODULES_JSON = "hyper_lora_modules.json"
PARTS = {  # file stem -> attribute of HyperLoRA
    "hyper_lora_modules": "lora_modules",
    "resampler": "resampler",
    "id_projector": "id_projector",
    "base_resampler": "base_resampler",
}
RELEASE_DIM_HEAD = 64  # heads are not recoverable from shapes; the release uses 12 x 64
RELEASE_ID_WEIGHT = 0.85  # the ID-LoRA weight the release recommends (its README: 0.75-0.85)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the problem."""


def _order_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def save_checkpoint(model: HyperLoRA, folder: str | Path, *, dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write `model` in the official layout plus config.json (and `extra` run information)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    modules = {t.kohya_name: t.to_json() for t in model.targets}
    (folder / MODULES_JSON).write_text(json.dumps(modules, indent=2))
    metadata = {"format": "pt", "hyperlora_module_order_sha256": _order_digest(list(modules))}
    for stem, attribute in PARTS.items():
        part = getattr(model, attribute, None)
        if part is None:
            continue
        state = {k: (v.to(dtype) if dtype else v).detach().contiguous() for k, v in part.state_dict().items()}
        save_file(state, str(folder / f"{stem}.safetensors"), metadata=metadata)
    config = {"hyperlora_config": model.config.to_dict(), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def recommended_id_weight(folder: str | Path | None) -> float:
    """The ID-LoRA weight to use a checkpoint at: config.json's `id_weight`, which `hyperlora.train.ship` writes with
    the evaluation that measured it, else the release's 0.85 (official folders have no config.json)."""
    path = Path(folder) / "config.json" if folder else None
    if path is None or not path.is_file():
        return RELEASE_ID_WEIGHT
    weight = json.loads(path.read_text()).get("id_weight", RELEASE_ID_WEIGHT)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise CheckpointError(f"{path}: id_weight must be a positive number, got {weight!r}")
    return float(weight)


# --- loading ----------------------------------------------------------------------------------


def _read_modules_json(folder: Path, layers_per_block) -> list[TargetModule]:
    path = folder / MODULES_JSON
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{path}: expected a non-empty object of module name -> sizes")
    targets = []
    for name, sizes in entries.items():
        if not isinstance(sizes, dict) or "hidden_size" not in sizes:
            raise CheckpointError(f"{path}: entry {name!r} lacks 'hidden_size'")
        try:
            diffusers_name = resolve_module_name(name, layers_per_block)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from None
        targets.append(TargetModule(diffusers_name, int(sizes["hidden_size"]), sizes.get("cross_attention_dim")))
    return targets


def _shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def _infer_config(folder: Path, shapes: dict[str, dict[str, tuple[int, ...]]]) -> HyperLoRAConfig:
    """Rebuild the config of an official folder (no config.json) from its tensor shapes."""
    modules, resampler = shapes["hyper_lora_modules"], shapes["resampler"]
    for key in ("0.to_q.id_down_basis", "proj_in.weight", "proj_out.weight", "layers.0.attn1.to_q.weight"):
        table = modules if key.startswith("0.") else resampler
        if key not in table:
            raise CheckpointError(f"{folder}: cannot infer the configuration, key {key!r} is missing")
    hyper_dim, _, rank = modules["0.to_q.id_down_basis"]
    dim = resampler["proj_in.weight"][1]
    inner = resampler["layers.0.attn1.to_q.weight"][0]
    if inner % RELEASE_DIM_HEAD:
        raise CheckpointError(f"{folder}: attention width {inner} is not a multiple of {RELEASE_DIM_HEAD}; add a config.json")
    config = dict(
        hyper_dim=hyper_dim, rank=rank, dim=dim, heads=inner // RELEASE_DIM_HEAD, dim_head=RELEASE_DIM_HEAD,
        depth=len({k.split(".")[1] for k in resampler if k.startswith("layers.")}),
        ff_mult=resampler["layers.0.ff.net.0.proj.weight"][0] // dim,
        has_base_lora="0.to_q.base_down_basis" in modules,
        encoder_types=["clip", "arcface"] if "proj_in_2.weight" in resampler else ["clip"],
    )  # fmt: skip
    if "id_projector" in shapes:
        out_features, config["id_embed_dim"] = shapes["id_projector"]["0.weight"]
        config["num_id_tokens"] = out_features // dim
    return HyperLoRAConfig.from_dict(config)


def _compare(path: Path, expected: dict, found: dict, hint: str = "") -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: expected {list(expected[k])}, found {list(found[k])}" for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    if wrong:
        problems.append(f"shape mismatch: {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''} ({len(wrong)} in all)")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems) + hint)


def _check_against_unet(folder: Path, targets: list[TargetModule], unet) -> None:
    unet_targets = {t.name: t for t in find_targets(unet)}
    if len(targets) != len(unet_targets):
        raise CheckpointError(
            f"{folder / MODULES_JSON}: wrong module count: it lists {len(targets)} modules, "
            f"the UNet has {len(unet_targets)} attention modules"
        )
    for t in targets:
        if t.name not in unet_targets:
            raise CheckpointError(f"{folder / MODULES_JSON}: module {t.kohya_name!r} ({t.name}) is not in the UNet")
        if t.to_json() != unet_targets[t.name].to_json():
            raise CheckpointError(f"{folder / MODULES_JSON}: {t.name}: checkpoint {t.to_json()}, UNet {unet_targets[t.name].to_json()}")


def load_checkpoint(
    folder: str | Path, *, unet=None, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> HyperLoRA:
    """Load an official or our own checkpoint folder; with `unet`, check it fits that UNet."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    required = [MODULES_JSON, "hyper_lora_modules.safetensors", "resampler.safetensors"]
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: missing {missing}; a HyperLoRA folder holds {required} and id_projector.safetensors")
    layers_per_block = unet.config.layers_per_block if unet is not None else 2
    targets = _read_modules_json(folder, layers_per_block)
    if unet is not None:
        _check_against_unet(folder, targets, unet)
    files = {stem: folder / f"{stem}.safetensors" for stem in PARTS if (folder / f"{stem}.safetensors").is_file()}
    read = {stem: _shapes(path) for stem, path in files.items()}
    shapes = {stem: s for stem, (s, _) in read.items()}
    order = read["hyper_lora_modules"][1].get("hyperlora_module_order_sha256")
    if order and order != _order_digest([t.kohya_name for t in targets]):
        raise CheckpointError(f"{folder / MODULES_JSON}: module order differs from the order the tensors were saved in (reordered JSON?)")
    if (folder / "config.json").is_file():
        config = HyperLoRAConfig.from_dict(json.loads((folder / "config.json").read_text())["hyperlora_config"])
    else:
        config = _infer_config(folder, shapes)
    with torch.device("meta"):
        model = HyperLoRA(config, targets)
    for stem, attribute in PARTS.items():
        part = getattr(model, attribute, None)
        if part is None and stem in files:
            raise CheckpointError(f"{files[stem]}: present but the configuration has no {attribute} ({config.to_dict()})")
        if part is None:
            continue
        if stem not in files:
            raise CheckpointError(f"{folder}: missing {stem}.safetensors, which this configuration needs")
        expected = {k: tuple(v.shape) for k, v in part.state_dict().items()}
        hint = f" (modules are matched to tensors in {MODULES_JSON} order: is it reordered or from another UNet?)" if stem == "hyper_lora_modules" else ""
        _compare(files[stem], expected, shapes[stem], hint)
        with safe_open(str(files[stem]), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in expected}
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        part.load_state_dict(state, assign=True)
    return model.eval()
