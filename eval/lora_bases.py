"""ID bases spanned by per-person free LoRAs: do bases that hold what LoRAs tuned to people learn reach further?

Issue 17's measurements on 16 held-out people: a free rank-8 LoRA tuned to one person reaches 0.310 ID similarity,
the best coefficients over the trained bases 0.20-0.23 (32 or 128 of them, bases trained at 1x or 10x the lr). The
bases, trained by the diffusion loss through the resampler, do not span what the free LoRAs learn. Two steps build
bases that do, by construction:

    fit    one free rank-r ID-LoRA per training person (the PEFT start, shared by all), fitted with the stage-3
           loss of case (a) on that person's looks from the training pool (trigger words, ID + the frozen Base-LoRA,
           the face-weighted diffusion loss), batched as `eval.coefficient_targets fit` fits coefficient rows.
    bases  per target linear and factor (down, up), the leading K right singular vectors of the people's stacked
           factors become the K basis matrices, scaled so that a person's coefficients have unit norm on average
           (the resampler's tokens are unit-norm). Writes a checkpoint (the given one with these ID bases) and the
           people's coefficient rows as a table, which `eval.coefficient_targets distill` maps the resampler onto.

    python -m eval.lora_bases fit --checkpoint CKPT --people 0:48 --steps 1500 --out runs/bases/a
    python -m eval.lora_bases bases --checkpoint CKPT --loras runs/bases/a runs/bases/b --held-out 8 --out runs/bases/k32
    python -m eval.coefficient_targets distill --checkpoint runs/bases/k32/model --tables runs/bases/k32 ...

The factors of different people are comparable because every free LoRA starts from the same lora_down; a LoRA's
factors are otherwise defined only up to an invertible r x r map. This is a departure from the paper (whose bases
train with the diffusion loss alone), measured as a diagnostic of the bases' reach.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from hyperlora.checkpoint import load_checkpoint
from hyperlora.config import TOKENS_PER_MODULE, HyperLoRAConfig
from hyperlora.finetune import zero_lora
from hyperlora.lora import LoRAWeights
from hyperlora.targets import LAYER_KEYS
from hyperlora.train.data import TRAINING_SET_FILE, TrainingSet

from .coefficient_targets import (
    TABLE_FILE,
    FitSetup,
    between,
    fit_rows,
    load_tables,
    parse_people,
    row_cosine,
    save_result,
)

logger = logging.getLogger(__name__)

LORAS_FILE = "loras.safetensors"


def split_row(rows: torch.Tensor, rank: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows [P, r * in + out * r] -> (lora_down [P, r, in], lora_up [P, out, r])."""
    return rows[:, : rank * fan_in].view(-1, rank, fan_in), rows[:, rank * fan_in :].view(-1, fan_out, rank)


class FreeLoRATable(nn.Module):
    """One free ID-LoRA per person: per target linear a row [r * in + out * r] of (lora_down, lora_up), all rows
    starting at the same PEFT init (lora_down shared, lora_up zero); `rows` (set per batch) picks each group's."""

    def __init__(self, hyperlora, people: int, seed: int = 0):
        super().__init__()
        shapes = {
            t.linear_path(k): (t.in_features(k), t.out_features(k)) for t in hyperlora.targets for k in LAYER_KEYS
        }
        self.hyperlora = hyperlora  # frozen: the stage loss assembles the Base-LoRA from it
        self.rank, self.shapes = hyperlora.config.rank, shapes
        start = zero_lora(shapes, self.rank, HyperLoRAConfig.alpha(self.rank), seed)
        self.tables = nn.ModuleList()
        for down, up in start.layers.values():
            row = torch.cat([down.flatten(), up.flatten()])
            self.tables.append(nn.Embedding.from_pretrained(row.expand(people, -1).clone(), freeze=False, sparse=True))
        self.rows: torch.Tensor | None = None

    def loras(self, rows: torch.Tensor) -> LoRAWeights:
        layers = {
            path: split_row(table(rows), self.rank, *shape)
            for (path, shape), table in zip(self.shapes.items(), self.tables)
        }
        return LoRAWeights(layers, self.rank, HyperLoRAConfig.alpha(self.rank))

    def forward(self, *, branch: str, clip=None, arcface=None) -> LoRAWeights:
        if branch != "id" or self.rows is None:
            raise ValueError("a FreeLoRATable makes ID-LoRAs of the rows set for the batch")
        return self.loras(self.rows)


def fit_loras(checkpoint: str, cache: str, people: list[int], out: str | Path, *, steps: int = 1500, lr: float = 2e-3,
              looks: int = 2, face_loss_weight: float = 9.0, seed: int = 0, pipeline: str = "data/toy/sdxl",
              world: str = "toy", progress: bool = True, id_loss_weight: float = 0.0,
              id_recognizer: str = "", id_loss_path_steps: int = 0) -> Path:  # fmt: skip
    """Fit one free ID-LoRA per person (see the module docstring); writes OUT/loras.safetensors (each linear's
    tables [P, r * in + out * r], Adam's moments, the people) and OUT/log.jsonl. Resumes from OUT's file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = FitSetup.load(checkpoint, cache, people, pipeline=pipeline, world=world)
    table = FreeLoRATable(setup.model, len(people), seed)
    optimizer = torch.optim.SparseAdam(table.tables.parameters(), lr=lr)
    done = 0
    if (out / LORAS_FILE).is_file():  # resume: the tables and Adam's moments as saved
        saved = load_file(str(out / LORAS_FILE))
        for i, embedding in enumerate(table.tables):
            embedding.weight.data.copy_(saved[f"{i}.raw"])
            if f"{i}.adam.step" in saved:
                optimizer.state[embedding.weight] = {"step": int(saved[f"{i}.adam.step"]),
                                                     **{k: saved[f"{i}.adam.{k}"] for k in ("exp_avg", "exp_avg_sq")}}  # fmt: skip
        done = int(saved["done"])

    def save(step: int) -> None:
        tensors = {"people": torch.tensor(people), "done": torch.tensor(step)}
        for i, embedding in enumerate(table.tables):
            tensors[f"{i}.raw"] = embedding.weight.detach()
            tensors |= {
                f"{i}.adam.{k}": torch.as_tensor(v) for k, v in optimizer.state.get(embedding.weight, {}).items()
            }
        metadata = {"checkpoint": checkpoint, "paths": json.dumps(list(table.shapes)), "rank": str(table.rank)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{LORAS_FILE}.tmp"), metadata=metadata)
        (out / f"{LORAS_FILE}.tmp").replace(out / LORAS_FILE)

    fit_rows(setup, table, optimizer, out, save, steps=steps, done=done, looks=looks, face_loss_weight=face_loss_weight,
             seed=seed, desc="fit LoRAs", progress=progress, id_loss_weight=id_loss_weight,
             id_recognizer=id_recognizer, id_loss_path_steps=id_loss_path_steps)  # fmt: skip
    return out / LORAS_FILE


def load_loras(folders: list[str], hyperlora) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(people [P], {path: (lora_down [P, r, in], lora_up [P, out, r])}) of several fit folders, in their order."""
    parts = [load_file(str(Path(f) / LORAS_FILE)) for f in folders]
    rank = hyperlora.config.rank
    loras = {}
    for i, target_key in enumerate((t, k) for t in hyperlora.targets for k in LAYER_KEYS):
        target, key = target_key
        fan_in, fan_out = target.in_features(key), target.out_features(key)
        raw = torch.cat([p[f"{i}.raw"] for p in parts]).float()
        if raw.shape[1] != rank * (fan_in + fan_out):
            raise ValueError(f"{folders}: table {i} has rows of {raw.shape[1]}, {target.linear_path(key)} of this "
                             f"checkpoint needs {rank * (fan_in + fan_out)} (fitted over another checkpoint?)")  # fmt: skip
        loras[target.linear_path(key)] = split_row(raw, rank, fan_in, fan_out)
    return torch.cat([p["people"] for p in parts]), loras


def principal_bases(factors: torch.Tensor, hyper_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """People's flattened factors [P, n] -> (bases [K, n], projection [n, K]) with `factors @ projection` the
    people's coefficients: the leading right singular vectors scaled so that those coefficients' mean squared norm
    is 1 (a person's is exactly sum_k c_k * bases[k] within the span). Beyond min(P, n) components the bases are zero."""
    _, singular, vh = torch.linalg.svd(factors.double(), full_matrices=False)
    kept = min(hyper_dim, len(singular))
    scale = singular[:kept] * (kept / len(factors)) ** 0.5  # coefficients U * sqrt(P / kept): mean |c|^2 = 1
    bases = torch.zeros(hyper_dim, factors.shape[1], dtype=torch.float64)
    bases[:kept] = scale[:, None] * vh[:kept]
    projection = torch.zeros(factors.shape[1], hyper_dim, dtype=torch.float64)
    projection[:, :kept] = vh[:kept].T / scale.clamp_min(1e-12)
    return bases.float(), projection.float()


def delta_error(reference: LoRAWeights, approximation: LoRAWeights) -> torch.Tensor:
    """Per person [P]: |dW' - dW| / |dW| over all target linears together (dW = lora_up @ lora_down)."""
    error = norm = 0
    for path, (down, up) in reference.layers.items():
        other_down, other_up = approximation.layers[path]
        delta = up @ down
        error = error + (other_up @ other_down - delta).pow(2).sum((1, 2))
        norm = norm + delta.pow(2).sum((1, 2))
    return (error / norm).sqrt()


@torch.no_grad()
def build_bases(checkpoint: str, folders: list[str], out: str | Path, *, hyper_dim: int | None = None,
                held_out: int = 0) -> dict:  # fmt: skip
    """The checkpoint with ID bases from the fitted LoRAs' principal directions (see the module docstring); writes
    OUT/model (float32), OUT/hyperlora (fp16), OUT/table.safetensors (every fitted person's unit-norm ID tokens over
    the new bases; `start` holds the same) and OUT/summary.json: how much of the people's LoRAs the bases keep."""
    from hyperlora.train.grow import grow

    out = Path(out)
    model = load_checkpoint(checkpoint, dtype=torch.float32)
    hyper_dim = hyper_dim or model.config.hyper_dim
    if hyper_dim < model.config.hyper_dim:
        raise ValueError(f"--hyper-dim {hyper_dim}: at least the checkpoint's {model.config.hyper_dim} (bases grow)")
    if hyper_dim > model.config.hyper_dim:
        model = grow(model, hyper_dim=hyper_dim)
    people, loras = load_loras(folders, model)
    if not 0 <= held_out < len(people) - 1:
        raise ValueError(f"--held-out {held_out}: keep at least two of the {len(people)} fitted people in the bases")
    fitted = len(people) - held_out
    coefficients = []  # per target linear: (down [P, K], up [P, K]), in token order
    for target, module in zip(model.targets, model.lora_modules):
        for key in LAYER_KEYS:
            down, up = loras[target.linear_path(key)]
            layer = getattr(module, key)
            pair = []
            for factors, basis, shape in ((down, layer.id_down_basis, down.shape[1:]),
                                          (up, layer.id_up_basis, up.shape[1:])):  # fmt: skip
                flat = factors.flatten(1)
                bases, projection = principal_bases(flat[:fitted], hyper_dim)
                # the basis layout: down [K, in, r] from lora_down [r, in]; up [K, r, out] from lora_up [out, r]
                basis.copy_(bases.view(hyper_dim, *shape).transpose(1, 2))
                pair.append(flat @ projection)
            coefficients.append(torch.stack(pair, 1))  # [P, 2, K]
    raw = torch.cat(coefficients, 1)  # [P, Q, K]
    assert raw.shape[1] == TOKENS_PER_MODULE * len(model.targets)
    tokens = F.normalize(raw, dim=-1)
    free = LoRAWeights(loras, model.config.rank, HyperLoRAConfig.alpha(model.config.rank))
    errors = {"raw": delta_error(free, model.assemble(raw)), "unit": delta_error(free, model.assemble(tokens))}
    summary = {"people": len(people), "in_bases": fitted, "held_out": held_out, "hyper_dim": hyper_dim,
               "token_norm_mean": float(raw.norm(dim=-1).mean()), "token_norm_std": float(raw.norm(dim=-1).std())}  # fmt: skip
    for name, error in errors.items():  # the relative error of each person's dW, in the bases' span
        summary[f"delta_error_{name}_in_bases"] = float(error[:fitted].mean())
        if held_out:
            summary[f"delta_error_{name}_held_out"] = float(error[fitted:].mean())
    extra = {"bases_from_loras": [str(f) for f in folders], "checkpoint": checkpoint, "held_out": held_out}
    save_result(model, out, extra, summary)
    table = {
        "people": people,
        "tokens": tokens,
        "start": tokens.clone(),
        "raw": raw.flatten(1),
        "done": torch.tensor(0),
    }
    save_file({k: v.contiguous() for k, v in table.items()}, str(out / TABLE_FILE), metadata={"checkpoint": str(out)})
    return summary


@torch.no_grad()
def fit_readout(checkpoint: str, cache: str, tables: list[str], out: str | Path, *, val_people: int = 16,
                ridge: float = 1e-3) -> dict:  # fmt: skip
    """The ID resampler's output projection refitted in closed form: ridge regression from its frozen trunk's last
    latents (every look of every table person, plain and augmented features) onto that person's coefficient row, so
    the resampler addresses new bases (`bases`) without a training run. The last `val_people` rows are held out.
    Writes OUT/model, OUT/hyperlora and OUT/summary.json (mean per-token cosine of the predicted rows, train and held
    out, and between different people's)."""
    out = Path(out)
    people, targets, _ = load_tables(tables)
    if not 0 < val_people < len(people):
        raise ValueError(f"--val-people {val_people}: keep some of the {len(people)} table people on each side")
    data, _ = TrainingSet.load(Path(cache) / TRAINING_SET_FILE)
    model = load_checkpoint(checkpoint, dtype=torch.float32)
    row_of = {int(p): i for i, p in enumerate(people)}
    images = torch.tensor([i for i in data.valid.nonzero().squeeze(1).tolist() if int(data.person[i]) in row_of])
    rows = torch.tensor([row_of[int(data.person[i])] for i in images])
    head = model.resampler.proj_out
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    for clip, arcface in ((data.clip_id, data.arcface), (data.clip_id_aug, data.arcface_aug)):
        for chunk in images.split(256):
            model.id_coefficients(clip=clip[chunk].float(), arcface=arcface[chunk].float())
    hook.remove()
    latents = torch.cat(captured)  # [2 * images, Q, dim]
    rows = rows.repeat(2)
    train = rows < len(people) - val_people
    x = torch.cat([latents, torch.ones(*latents.shape[:2], 1)], -1)[train].flatten(0, 1).double()  # bias column
    y = targets[rows[train]].flatten(0, 1).double()  # [N * Q, K]: unit rows; the output is normalised anyway
    gram = x.T @ x
    solution = torch.linalg.solve(
        gram + ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype), x.T @ y
    )
    head.weight.copy_(solution[:-1].T.float())
    head.bias.copy_(solution[-1].float())
    predicted = F.normalize(head(latents), dim=-1)
    summary = {"people": len(people), "val_people": val_people, "ridge": ridge}
    first_look = torch.zeros(len(rows), dtype=torch.bool)  # one row a person (plain features) for `between`
    first_look[: len(images)] = torch.cat([torch.tensor([True]), rows[1 : len(images)] != rows[: len(images) - 1]])
    for name, mask in (("train", train), ("val", ~train)):
        summary[f"{name}_cosine"] = float(row_cosine(predicted[mask], targets[rows[mask]]).mean())
        summary[f"{name}_between"] = between(predicted[mask & first_look])
    summary["between_rows"] = between(targets)
    save_result(
        model, out, {"readout_from": [str(t) for t in tables], "checkpoint": checkpoint, "ridge": ridge}, summary
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.lora_bases", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit, bases, readout = sub.add_parser("fit"), sub.add_parser("bases"), sub.add_parser("readout")
    for p in (fit, bases, readout):
        p.add_argument("--checkpoint", required=True, help="the HyperLoRA whose targets, rank and Base-LoRA are used")
        p.add_argument("--out", required=True)
    for p in (fit, readout):
        p.add_argument(
            "--cache",
            default="runs/train/toy_v1/cache/train-62b5f0b2d4a48a9d",
            help="a training pool folder holding training_set.safetensors",
        )
    fit.add_argument("--people", required=True, help="training people: 'a:b' or '1,2,3'")
    fit.add_argument("--steps", type=int, default=1500)
    fit.add_argument("--lr", type=float, default=2e-3)
    fit.add_argument("--looks", type=int, default=2, help="looks of one person per batch sharing its LoRA")
    fit.add_argument("--seed", type=int, default=0, help="the batches and the shared lora_down start")
    fit.add_argument("--threads", type=int, default=1)
    fit.add_argument("--world", choices=("toy", "sdxl"), default="toy")
    fit.add_argument("--pipeline", default="data/toy/sdxl", help="the frozen base model (a diffusers SDXL folder)")
    fit.add_argument("--id-loss-weight", type=float, default=0.0,
                     help="add the identity loss (hyperlora.train.identity_loss)")  # fmt: skip
    fit.add_argument("--id-recognizer", default="", help="its box-crop recogniser (recognizer.safetensors)")
    fit.add_argument("--id-loss-path-steps", type=int, default=0,
                     help="read it on faces sampled from pure noise along this many DDIM steps (0: one-step x0)")  # fmt: skip
    bases.add_argument("--loras", nargs="+", required=True, help="fit folders (their people in this order)")
    bases.add_argument("--hyper-dim", type=int, default=None, help="K (default: the checkpoint's; larger grows it)")
    bases.add_argument("--held-out", type=int, default=0, help="the last N fitted people stay out of the bases")
    readout.add_argument("--tables", nargs="+", required=True, help="folders of `bases` (or coefficient fits)")
    readout.add_argument("--val-people", type=int, default=16, help="the last N table people stay out of the fit")
    readout.add_argument("--ridge", type=float, default=1e-3, help="times the mean diagonal of the Gram matrix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command != "bases" and not (Path(args.cache) / TRAINING_SET_FILE).is_file():
        parser.error(f"--cache {args.cache}: no {TRAINING_SET_FILE} (a pool made by `python -m hyperlora.train`)")
    if args.command == "fit":
        torch.set_num_threads(args.threads)
        fit_loras(args.checkpoint, args.cache, parse_people(args.people), args.out, steps=args.steps, lr=args.lr,
                  looks=args.looks, seed=args.seed, pipeline=args.pipeline, world=args.world,
                  id_loss_weight=args.id_loss_weight, id_recognizer=args.id_recognizer,
                  id_loss_path_steps=args.id_loss_path_steps)  # fmt: skip
    elif args.command == "readout":
        print(json.dumps(fit_readout(args.checkpoint, args.cache, args.tables, args.out, val_people=args.val_people,
                                     ridge=args.ridge), indent=2))  # fmt: skip
    else:
        missing = [f for f in args.loras if not (Path(f) / LORAS_FILE).is_file()]
        if missing:
            parser.error(f"--loras: no {LORAS_FILE} in {missing}")
        summary = build_bases(args.checkpoint, args.loras, args.out, hyper_dim=args.hyper_dim, held_out=args.held_out)
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
