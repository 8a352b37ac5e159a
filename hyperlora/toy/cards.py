"""Model cards for the toy models: what was trained, how, from which commit, and how well it does.

Every toy trainer ends with `write_model_card(folder, ...)`, which writes two files beside the
weights: `model_card.json` (machine-readable: config, command line, git commit, training seconds,
quality figures and gates) and a short `README.md` that says the same in words. A model folder
therefore reloads and explains itself with nothing else (STYLE.md, rule 3).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

CARD_JSON = "model_card.json"
CARD_README = "README.md"


# Torch thread counts this process was switched between while it ran ({"utc", "from", "to"}), as a parallel build shares
# an idle core (hyperlora.toy.build.listen_for_thread_share); recorded in the cards it writes.
THREAD_CHANGES: list[dict] = []

def git_commit(repo: str | Path | None = None) -> str | None:
    """`git rev-parse HEAD` of the repository holding this package (None outside a git checkout)."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def git_dirty(folder: str | Path | None = None) -> bool | None:
    """True when `folder` (default: the hyperlora package) differs from the commit: modified or
    untracked source files, i.e. the code that trained the model is not all in `git_commit`."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=folder, capture_output=True, text=True,
                             timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def config_dict(config) -> dict:
    """A dataclass config (or a plain dict) as JSON-ready values: tuples become lists."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(values, default=str))


def folder_megabytes(folder: str | Path) -> float:
    """Size of the weight files (*.safetensors, *.onnx, in subfolders too) in `folder`, in MB (10^6 bytes)."""
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.onnx") for p in Path(folder).rglob(pattern)) / 1e6


def _table(rows: list[dict], indent: str) -> list[str]:
    """A markdown table of the scalar fields of a list of dicts (e.g. a validation curve)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, str))]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return ["", *(indent + "  " + line for line in lines), ""]


def _figure_lines(figures: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in figures.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += [f"{indent}- {key}:", *_table(value, indent)]
        elif isinstance(value, dict):
            lines.append(f"{indent}- {key}:")
            lines += _figure_lines(value, indent + "  ")
        elif isinstance(value, float):
            lines.append(f"{indent}- {key}: {value:.4g}")
        else:
            lines.append(f"{indent}- {key}: {value}")
    return lines


def write_model_card(
    folder: str | Path,
    *,
    name: str,
    summary: str,
    config,
    train_seconds: float,
    figures: dict,
    gates: dict[str, bool] | None = None,
    command: list[str] | None = None,
    extra: dict | None = None,
    threads: int | None = None,
) -> Path:
    """Write model_card.json and README.md into `folder`; returns the JSON path.

    `threads`: the torch threads the model trained with, where that was another process (default: this one's).

    `figures` are the evaluation's numbers (nested dicts allowed), `gates` the named pass/fail
    checks, `command` the command line (defaults to this process's `sys.argv`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist: save the model before its card")
    card = {
        "name": name,
        "summary": summary,
        "config": config_dict(config),
        "command": list(command) if command is not None else [sys.executable, *sys.argv],
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "train_seconds": round(float(train_seconds), 2),
        "figures": json.loads(json.dumps(figures, default=float)),
        "gates": dict(gates or {}),
        "passed": all((gates or {}).values()) if gates else None,
        "weights_mb": round(folder_megabytes(folder), 3),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": threads or torch.get_num_threads(),
                        **({"thread_changes": list(THREAD_CHANGES)} if THREAD_CHANGES else {})},  # fmt: skip
        **(extra or {}),
    }
    path = folder / CARD_JSON
    path.write_text(json.dumps(card, indent=2) + "\n")
    (folder / CARD_README).write_text(_readme(card))
    return path


def _threads_text(environment: dict) -> str:
    changes = environment.get("thread_changes", [])
    if not changes:
        return f"{environment['threads']} torch thread(s)"
    steps = ", ".join(f"{c['to']} from {c['utc']}" for c in changes)
    return f"{changes[0]['from']} torch thread(s), {steps} (a core the parallel build freed)"


def _readme(card: dict) -> str:
    gates = card["gates"]
    verdict = "no gates" if not gates else ("PASSED" if card["passed"] else "FAILED")
    # A card re-evaluated after shipping (`ship --reevaluate`) keeps the ship's commit and date in `shipped_by`.
    shipped = card.get("shipped_by") or {"git_commit": card["git_commit"], "created_utc": card["created_utc"]}
    dirty = " plus uncommitted changes" if card["git_dirty"] else ""
    lines = [
        f"# {card['name']}",
        "",
        card["summary"],
        "",
        f"- trained in {card['train_seconds']:.0f} s with {_threads_text(card['environment'])}"
        + f" (torch {card['environment']['torch']}), {shipped['created_utc']}",
        f"- git commit: {shipped['git_commit'] or 'unknown'}" + (dirty if "shipped_by" not in card else ""),
    ]
    if "shipped_by" in card:
        lines.append(f"- re-evaluated at git commit {card['git_commit'] or 'unknown'}{dirty}, {card['created_utc']}")
    lines += [
        f"- weights: {card['weights_mb']:.1f} MB",
        f"- quality gates: {verdict}",
    ]
    lines += [f"  - {key}: {'pass' if ok else 'FAIL'}" for key, ok in gates.items()]
    lines += ["", "## Figures", "", *_figure_lines(card["figures"]), "", "## Command", "", "```",
              " ".join(card["command"]), "```", "",
              *([f"Shipped by `{' '.join(card['shipped_by']['command'])}`.", ""] if "shipped_by" in card else []),
              "The full configuration is in `model_card.json` (`config`).", ""]  # fmt: skip
    return "\n".join(lines)


def read_model_card(folder: str | Path) -> dict:
    """The model_card.json of `folder`; a missing card is an error that names the folder."""
    path = Path(folder) / CARD_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CARD_JSON}: was it written by a toy trainer?")
    return json.loads(path.read_text())
