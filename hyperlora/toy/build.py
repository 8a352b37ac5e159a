"""`python -m hyperlora.toy build`: retrain every toy model from scratch, in dependency order, and ship the toy SDXL.

Steps: CLIP, VAE, faces (detector + recogniser), UNet (it needs CLIP's text tower and the VAE), then
the StableDiffusionXLPipeline folder, evaluated with the others as judges, and carded. Each step is
one call `train_x(Config(), out/folder)` into its trainer (`Config.smoke()` with `--smoke`);
trainers are imported only when their step runs, so a broken trainer fails its own step and its
dependants, and the other steps still run. Everything is logged to `<out>/build.log`.

With `jobs=2` (the default) two steps run at once, each in its own process on one torch thread:
CLIP and VAE first, then faces and the UNet side by side. When a step ends and no other can start, the
steps still running share its core (`listen_for_thread_share`: the UNet goes to two threads once the faces
step is done). That is how the build fits its 90-minute budget on 2 cores: 89 minutes measured (CLIP 51.5
with its distillation teacher beside the VAE 45.6 with its identity-trait CNN, then faces 25.7 beside the
UNet 36.4, then the pipeline 1). The CLIP -> UNet chain is the critical path; the VAE left it when its
identity term moved to face crops (it took 55 minutes on whole images).
Each process logs to `<out>/logs/<step>.log`.

    <out>/clip/  faces/  vae/  unet/  sdxl/  build.log
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .pipeline import DEFAULT_TOY_DIR

logger = logging.getLogger(__name__)

BUILD_LOG = "build.log"


@dataclass(frozen=True)
class Step:
    """One trainer of the build: `module.trainer(module.config(), out / folder, **needed paths) -> Path`."""

    name: str
    module: str  # imported when the step runs
    trainer: str
    config: str  # dataclass with a `smoke()` preset
    folder: str  # output folder under the build's out dir (wiped before training: from scratch)
    needs: tuple[str, ...] = ()  # steps whose folders this one reads, passed as `<name>_path=`
    face_judged: bool = False  # gets `face_embed=`: the toy face models judge identity in its evaluation


STEPS = (
    Step("clip", "hyperlora.toy.clip", "train_clip", "CLIPTrainConfig", "clip"),
    Step("vae", "hyperlora.toy.vae", "train_vae", "VAETrainConfig", "vae", face_judged=True),
    Step("faces", "hyperlora.toy.faces", "build_faces", "FaceTrainConfig", "faces"),  # detector + recogniser + card
    Step("unet", "hyperlora.toy.unet", "train_unet", "UNetTrainConfig", "unet", needs=("clip", "vae")),
)
# What each step waits for when steps run side by side: the UNet trains on CLIP and VAE outputs;
# the pipeline step evaluates with every other model as a judge.
WAITS_FOR = {"clip": (), "vae": (), "faces": (), "unet": ("clip", "vae"), "sdxl": ("clip", "vae", "faces", "unet")}
PIPELINE_FOLDER = "sdxl"  # the assembled StableDiffusionXLPipeline, after every trainer
ALIASES = {"unet": ("unet", "sdxl")}  # --only unet also re-assembles the pipeline that wraps it
SELECTABLE = ("clip", "faces", "vae", "unet", "sdxl")
STANDIN_OK = ("clip", "vae")  # needs that `standins=True` may replace with random stand-ins


# POSIX only: where there is no SIGUSR1 (Windows) a parallel build's steps keep one thread each.
THREADS_SIGNAL = getattr(signal, "SIGUSR1", None)
SHARE_AFTER_S = 60.0  # a step's share changes only once it is this old: its trainer sets its own threads first


def listen_for_thread_share(threads_file: str | Path) -> None:
    """In a parallel build's step process: on THREADS_SIGNAL, set torch's thread count to the number in
    `threads_file`. The build raises it when a core falls idle (the UNet, once the faces step is done).
    Writing the file first tells the build that this process listens: before that, the signal would kill it."""
    if THREADS_SIGNAL is None:
        return
    import torch

    from .cards import THREAD_CHANGES

    def follow(signum, frame):
        threads, before = int(Path(threads_file).read_text()), torch.get_num_threads()
        if threads == before:  # e.g. a step that never set one thread (the pipeline's evaluation) told to use 2
            return
        torch.set_num_threads(threads)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        THREAD_CHANGES.append({"utc": now, "from": before, "to": threads})
        logger.info("torch threads set from %d to %d: this step's share of the build's cores", before, threads)

    signal.signal(THREADS_SIGNAL, follow)
    Path(threads_file).write_text(str(torch.get_num_threads()))


class StepUnavailable(RuntimeError):
    """A step that cannot run yet: its trainer is not written, or a model it needs is missing."""


def selected_steps(only: list[str] | None) -> list[str]:
    """Step names to run, in build order ("sdxl" last); None: all of them."""
    order = [step.name for step in STEPS] + ["sdxl"]
    if not only:
        return order
    unknown = set(only) - set(SELECTABLE)
    if unknown:
        raise ValueError(f"unknown build steps {sorted(unknown)}; known: {list(SELECTABLE)}")
    wanted = {name for item in only for name in ALIASES.get(item, (item,))}
    return [name for name in order if name in wanted]


def _trainer(step: Step):
    try:
        module = importlib.import_module(step.module)
    except ModuleNotFoundError as err:
        if err.name != step.module:
            raise  # the module exists but something it imports is missing: a real error
        raise StepUnavailable(f"step {step.name}: {step.module} is not written yet") from err
    trainer, config = getattr(module, step.trainer, None), getattr(module, step.config, None)
    if trainer is None or config is None:
        raise StepUnavailable(f"step {step.name}: {step.module} has no {step.trainer}({step.config}, out_dir) yet")
    return trainer, config


def _needed_paths(step: Step, out: Path, standins: bool) -> dict:
    folders = {s.name: s.folder for s in STEPS}
    paths = {}
    for need in step.needs:
        folder = out / folders[need]
        if folder.is_dir():
            paths[f"{need}_path"] = folder
        elif standins and need in STANDIN_OK:
            logger.warning("step %s: %s missing, using a random stand-in (plumbing only)", step.name, folder)
            paths[f"{need}_path"] = None
        else:
            raise StepUnavailable(f"step {step.name} needs {folder}: build it first (--only {need}) or pass --standins")
    return paths


def run_step(step: Step, out: Path, *, smoke: bool, standins: bool = False) -> Path:
    """Train one model from scratch into out / step.folder."""
    trainer, config_class = _trainer(step)
    paths = _needed_paths(step, out, standins)
    config = config_class.smoke() if smoke else config_class()
    if step.face_judged:
        paths["face_embed"] = _face_judge(out, step.name)
    folder = out / step.folder
    if folder.exists():
        shutil.rmtree(folder)
    logger.info("step %s: %s(%s) -> %s", step.name, step.trainer, config, folder)
    return trainer(config, folder, **paths)


def _face_judge(out: Path, step: str):
    """The toy ArcFace embedder that judges identity in a step's evaluation: the build's own face models if
    finished (card written), else the shipped ones. Loaded now, before a parallel faces step may wipe them."""
    from .pipeline import face_judges

    for folder in (out / "faces", DEFAULT_TOY_DIR / "faces"):
        if (folder / "model_card.json").is_file() and (folder / "recognizer.onnx").is_file():
            logger.info("step %s: identity judged by the face models in %s", step, folder)
            return face_judges(folder)[1]
    logger.warning("step %s: no finished toy face models: identity is not measured", step)
    return None


def ship_pipeline(out: Path, *, smoke: bool, standins: bool = False) -> Path:
    """Assemble <out>/sdxl from the trained parts, evaluate it with whichever judges exist, write its card."""
    from .cards import read_model_card, write_model_card
    from .pipeline import TOY_GUIDANCE, assemble_pipeline, clip_judge, evaluate_base_model, face_judges

    unet = out / "unet"
    if not unet.is_dir():
        raise StepUnavailable(f"step sdxl needs {unet}: build it first (--only unet)")
    parts = {name: out / name for name in ("clip", "vae")}
    for name, path in parts.items():
        if not path.is_dir():
            if not standins:
                raise StepUnavailable(f"step sdxl needs {path}: build it first (--only {name}) or pass --standins")
            parts[name] = None
    folder = out / PIPELINE_FOLDER
    if folder.exists():
        shutil.rmtree(folder)
    assemble_pipeline(unet, folder, clip_path=parts["clip"], vae_path=parts["vae"])
    detector, embedder = face_judges(out / "faces") if (out / "faces" / "recognizer.onnx").is_file() else (None, None)
    judges = {"judge": clip_judge(parts["clip"]) if parts["clip"] else None, "detector": detector, "embedder": embedder}
    sizes = dict(num_prompts=2, per_prompt=2, steps=2) if smoke else {}
    start = time.perf_counter()
    figures = evaluate_base_model(folder, **judges, **sizes)
    logger.info("toy SDXL evaluation: %s", figures)
    gates = figures.pop("gates")
    faces_card = out / "faces" / "model_card.json"
    if figures.get("identity_similarity") is not None and faces_card.is_file():
        # Diversity: people generated for one prompt should look like different people to the toy ArcFace,
        # i.e. their mean similarity should sit nearer its different-identity mean than its same-identity mean.
        verification = read_model_card(out / "faces")["figures"]["verification"]
        level = (verification["genuine_mean"] + verification["impostor_mean"]) / 2
        figures["identity_levels"] = {"same_identity_mean": verification["genuine_mean"],
                                      "different_identity_mean": verification["impostor_mean"]}  # fmt: skip
        gates[f"identity_similarity <= {level:.3f}"] = figures["identity_similarity"] <= level
        figures["passed"] = all(gates.values())
    unet_card = read_model_card(unet)
    figures["eval_seconds"] = time.perf_counter() - start
    figures["folder_mb"], figures["unet_mb"] = folder_size(folder) / 1e6, folder_size(folder / "unet") / 1e6
    config = {"evaluation": {**sizes, "guidance_scale": TOY_GUIDANCE}, "unet": unet_card["config"]}
    write_model_card(folder, name="toy SDXL base model", config=config, train_seconds=unet_card["train_seconds"],
                     figures=figures, gates=gates,
                     summary="The toy world's StableDiffusionXLPipeline: toy CLIP text tower as both text encoders, "
                     "toy VAE (f = 4), toy UNet, DPM++ 2M Karras. Load it with "
                     "StableDiffusionXLPipeline.from_pretrained(this folder).",
                     extra={"sources": {k: str(v) if v else "random stand-in" for k, v in parts.items()}})  # fmt: skip
    return folder


def build(out: str | Path = DEFAULT_TOY_DIR, *, smoke: bool = False, only: list[str] | None = None,
          standins: bool = False, jobs: int = 1, exact: bool = False) -> dict[str, str]:  # fmt: skip
    """Run the selected steps (`exact`: `only` without aliases); a failed step fails its dependants only.
    `jobs` > 1 runs that many steps at once, each in its own process. Returns {step: outcome}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(only) if exact and only else selected_steps(only)
    if jobs > 1 and len(names) > 1:
        return _build_parallel(out, names, smoke=smoke, standins=standins, jobs=jobs)
    handler = logging.FileHandler(out / BUILD_LOG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("hyperlora")
    package_logger.addHandler(handler)
    package_logger.setLevel(min(package_logger.getEffectiveLevel(), logging.INFO))
    steps = {step.name: step for step in STEPS}
    outcomes: dict[str, str] = {}
    try:
        logger.info("build into %s: steps %s%s", out, names, " (smoke)" if smoke else "")
        for name in names:
            start = time.perf_counter()
            try:
                if name == "sdxl":
                    ship_pipeline(out, smoke=smoke, standins=standins)
                else:
                    run_step(steps[name], out, smoke=smoke, standins=standins)
                outcomes[name] = f"done in {time.perf_counter() - start:.0f} s"
            except StepUnavailable as err:
                outcomes[name] = f"FAILED: {err}"
            except Exception as err:  # one broken trainer must not hide the others' results
                logger.exception("step %s raised", name)
                outcomes[name] = f"FAILED: {type(err).__name__}: {err}"
            logger.info("step %s: %s", name, outcomes[name])
    finally:
        package_logger.removeHandler(handler)
        handler.close()
    return outcomes


def _build_parallel(out: Path, names: list[str], *, smoke: bool, standins: bool, jobs: int) -> dict[str, str]:
    """Run `names` as `python -m hyperlora.toy build --step NAME` processes, at most `jobs` at once, each
    started once the selected steps it waits for (WAITS_FOR) are done; a failure fails its dependants.
    Each process starts on one torch thread; when fewer steps than `jobs` are running and none can start,
    the running ones share the idle cores (`jobs // running` threads each, back to 1 when another starts)."""
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    pending, running, outcomes = list(names), {}, {}
    told: dict[str, int] = {}  # threads each running process was last told to use
    while pending or running:
        for name in list(pending):
            waits = [d for d in WAITS_FOR[name] if d in names]
            failed = [d for d in waits if outcomes.get(d, "").startswith("FAILED")]
            if failed:
                outcomes[name] = f"FAILED: needs {', '.join(failed)}, which failed"
                pending.remove(name)
            elif len(running) < jobs and all(d in outcomes for d in waits):
                command = [sys.executable, "-m", "hyperlora.toy", "build", "--out", str(out), "--step", name,
                           "--threads-file", str(logs / f"{name}.threads")]  # fmt: skip
                command += ["--smoke"] * smoke + ["--standins"] * standins
                (logs / f"{name}.threads").unlink(missing_ok=True)  # from an earlier build: it is not listening yet
                log = open(logs / f"{name}.log", "w")
                running[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log, time.time())
                told[name] = 1
                pending.remove(name)
                print(f"step {name}: started (log: {logs / f'{name}.log'})", flush=True)
        # Shared out after the starts, not after the reaping below: a step that can start takes the freed core
        # (sharing it first gave the CLIP two threads for half a second when the VAE ended)
        _share_threads(running, told, jobs, logs)
        time.sleep(0.5)
        for name, (process, log, start) in list(running.items()):
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            seconds = time.time() - start
            outcomes[name] = (f"done in {seconds:.0f} s" if process.returncode == 0
                              else f"FAILED (exit {process.returncode} after {seconds:.0f} s): see {logs / name}.log")
            print(f"step {name}: {outcomes[name]}", flush=True)
    return {name: outcomes[name] for name in names}


def _share_threads(running: dict, told: dict[str, int], jobs: int, logs: Path) -> None:
    """Tell each running step process its share of `jobs` threads when the share has changed, through its
    threads file and THREADS_SIGNAL. A process is told on a later pass while it is younger than SHARE_AFTER_S
    (its trainer's own torch.set_num_threads would undo the share) or has not written that file (it is not
    listening yet, and the signal would kill it)."""
    if THREADS_SIGNAL is None or not running:
        return
    share = max(1, jobs // len(running))
    for name, (process, _, start) in running.items():
        threads_file = logs / f"{name}.threads"
        if told[name] != share and threads_file.is_file() and time.time() - start >= SHARE_AFTER_S:
            threads_file.write_text(str(share))
            try:
                os.kill(process.pid, THREADS_SIGNAL)
            except ProcessLookupError:  # it ended since the last poll: the next pass reaps it
                pass
            told[name] = share
            print(f"step {name}: now on {share} torch thread(s)", flush=True)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# Shipped toy models that `build` does not make (its 90-minute budget is spent): each has its own command,
# `python -m hyperlora.toy train-controlnet`, `train-traits` and `train-clip` (the evaluation's judge CLIP).
OWN_COMMAND_FOLDERS = ("controlnet", "traits", "clip_judge")


def info(out: str | Path = DEFAULT_TOY_DIR) -> list[dict]:
    """What is under the toy folder: each expected model folder, its size, and its card's verdict."""
    out = Path(out)
    rows = []
    for folder in [step.folder for step in STEPS] + [PIPELINE_FOLDER] + list(OWN_COMMAND_FOLDERS):
        path = out / folder
        row = {"folder": folder, "present": path.is_dir(), "mb": folder_size(path) / 1e6 if path.is_dir() else 0.0}
        card = path / "model_card.json"
        if card.is_file():
            values = json.loads(card.read_text())
            row.update(card=True, passed=values.get("passed"), created=values.get("created_utc"))
        else:
            row["card"] = False
        rows.append(row)
    return rows
