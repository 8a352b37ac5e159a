"""Run a notebook or a command once per grid point: `python -m hyperlora.sweep TARGET --grid k=v1,v2 --out DIR`.

    python -m hyperlora.sweep notebooks/08_sliders.ipynb --grid seed=0,1,2 --param smoke=True --out runs/sweeps/s
    python -m hyperlora.sweep "python -m hyperlora.train --preset toy --stage 1 --lr {lr} --out {out}" \\
        --grid lr=1e-4,3e-4 --out runs/sweeps/lr --jobs 2

A TARGET ending in .ipynb is executed with papermill, its parameters cell given the point's values, every --param
and out_dir=<the point's folder>. Any other TARGET is a shell command template: {key} is replaced by the point's
value as typed (or a --param's), {out} by the point's folder; every grid key must appear in it.

Each point runs in its own folder under --out, named by its values (`lr=1e-4_seed=0`), holding
    config.json     the values, the parameters, the exact command, the git commit
    log.txt         the command's stdout and stderr (papermill: its log and the cells' output)
    status.json     done or failed, the error (the last line of the traceback), the exit status, seconds
    done            the marker written last on success: a rerun skips points that have it, and runs the
                    others again from an empty folder (from Python, `run_sweep(..., keep_unfinished=True)` keeps
                    what they left, for a command that resumes itself, as eval.ablation's sweeps do)
and whatever the point writes, `summary.json` above all: its scalar entries (nested keys joined with ".")
become columns of --out/summary.csv and summary.json, one row per point, beside point, the values, status, error
and seconds. Points run in parallel, up to --jobs processes at a time; a failing point is recorded and the
others complete. Grid values are split at commas and typed as Python or JSON literals where they parse
(1e-4, 8, True, true), else kept as text.
"""

from __future__ import annotations

import argparse
import ast
import csv
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

DONE, STATUS, CONFIG, LOG, SUMMARY = "done", "status.json", "config.json", "log.txt", "summary.json"
COLUMNS = ("point", "status", "error", "seconds")  # besides the grid's keys, in every row
RESERVED = {"out", "out_dir"}  # set by the runner


@dataclass
class Point:
    """One combination of grid values: its folder name, the values as typed and as written."""

    name: str
    values: dict  # key -> typed value (notebook parameters, the summary table)
    text: dict[str, str]  # key -> the value as written on the command line (command templates)


def parse_value(text: str):
    """'1e-4' -> 0.0001, '8' -> 8, 'True' / 'true' -> True, anything else -> the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: list[str], what: str, split: bool) -> dict[str, list[str]]:
    """['lr=1e-4,3e-4', 'k=8'] -> {'lr': ['1e-4', '3e-4'], 'k': ['8']} (split at commas only when `split`)."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{what} {item!r}: expected key=value" + ("[,value...]" if split else ""))
        if key in out:
            raise ValueError(f"{what} key {key!r} given twice")
        if key in RESERVED:
            raise ValueError(f"{what} key {key!r} is set by the sweep runner (the point's folder)")
        out[key] = [v.strip() for v in values.split(",")] if split else [values]
        if any(not v for v in out[key]):
            raise ValueError(f"{what} {item!r}: empty value")
    return out


def grid_points(grid: dict[str, list[str]]) -> list[Point]:
    """The points of the grid, the first key varying slowest; folder names must be distinct."""
    points = []
    for combo in itertools.product(*grid.values()):
        text = dict(zip(grid, combo))
        name = "_".join(f"{k}={re.sub(r'[^A-Za-z0-9.+-]', '-', v)}" for k, v in text.items())
        points.append(Point(name, {k: parse_value(v) for k, v in text.items()}, text))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"grid values give the same folder name twice: {twice}")
    return points


def command_for(target: str, point: Point, params: dict[str, str], folder: Path) -> str:
    """The shell command of one point: a notebook's papermill call, or the template filled in."""
    if target.endswith(".ipynb"):
        notebook = Path(target).resolve()
        return shlex.join([sys.executable, "-m", "papermill", str(notebook), str(folder / notebook.name),
                           "-f", str(folder / "parameters.yaml"), "--cwd", str(notebook.parent), "-k", "python3",
                           "--no-progress-bar", "--log-output"])  # fmt: skip
    fields = {**params, **point.text, "out": str(folder)}
    return target.format(**{k: shlex.quote(v) for k, v in fields.items()})


def check_target(target: str, grid: dict, params: dict) -> None:
    """Fail before anything runs: a missing notebook, or a template whose fields and the grid disagree."""
    if target.endswith(".ipynb"):
        if not Path(target).is_file():
            raise FileNotFoundError(f"notebook {target}: no such file")
        return
    fields = {name for _, name, _, _ in string.Formatter().parse(target) if name is not None}
    unknown = sorted(fields - set(grid) - set(params) - {"out"})
    if unknown:
        raise ValueError(f"command template uses {unknown}, which are neither --grid nor --param keys")
    unused = sorted(set(grid) - fields)
    if unused:
        raise ValueError(f"grid keys {unused} do not appear in the command template (write them as {{key}})")
    if "out" not in fields:
        raise ValueError("the command template must write into its point's folder: use {out}")


def error_line(log: str) -> str:
    """The line that says what went wrong: the last 'SomeError: ...' of the log, else its last line."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[-1] if lines else ""


def run_point(target: str, point: Point, params: dict[str, str], folder: Path, timeout: float | None,
              keep_unfinished: bool = False) -> dict:  # fmt: skip
    """Run one point in an empty `folder` (with `keep_unfinished`, in what an unfinished run left there, for a
    command that resumes itself); returns its status record (also written to status.json)."""
    from .toy.cards import git_commit, git_dirty

    if folder.exists() and not keep_unfinished:
        shutil.rmtree(folder)  # a point that did not finish starts again from nothing
    folder.mkdir(parents=True, exist_ok=True)
    command = command_for(target, point, params, folder)
    typed_params = {k: parse_value(v) for k, v in params.items()}
    if target.endswith(".ipynb"):
        import yaml

        parameters = {**typed_params, **point.values, "out_dir": str(folder)}
        (folder / "parameters.yaml").write_text(yaml.safe_dump(parameters, sort_keys=False))
    config = {"point": point.name, "values": point.values, "params": typed_params, "target": target,
              "command": command, "git_commit": git_commit(), "git_dirty": git_dirty()}  # fmt: skip
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    start = time.perf_counter()
    with open(folder / LOG, "a" if keep_unfinished else "w") as log:  # kept: every attempt's output
        process = subprocess.Popen(command, shell=True, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            error = ""
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the whole group: papermill's kernel, a shell's children
            returncode, error = process.wait(), f"timed out after {timeout:g} s"
    seconds = round(time.perf_counter() - start, 2)
    if returncode and not error:
        error = error_line((folder / LOG).read_text(errors="replace")) or f"exit status {returncode}"
    status = {"status": "failed" if returncode else "done", "error": error, "returncode": returncode,
              "seconds": seconds}  # fmt: skip
    (folder / STATUS).write_text(json.dumps(status, indent=2) + "\n")
    if not returncode:
        (folder / DONE).touch()
    return status


def flatten(values: dict, prefix: str = "") -> dict:
    """Nested dict -> {'a.b': scalar}; lists and other non-scalars are left out."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


def summary_row(point: Point, folder: Path) -> dict:
    """One row of the sweep's table: the point, its values, status, error, seconds and its summary.json's scalars."""
    status = json.loads((folder / STATUS).read_text()) if (folder / STATUS).is_file() else {}
    row = {"point": point.name, **point.values, "status": status.get("status", "not run"),
           "error": status.get("error", ""), "seconds": status.get("seconds")}  # fmt: skip
    path = folder / SUMMARY
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            results = {"summary_error": f"{path}: not valid JSON ({err})"}
        for key, value in flatten(results if isinstance(results, dict) else {"summary": results}).items():
            row[f"summary.{key}" if key in row else key] = value
    return row


def write_summary(out: Path, rows: list[dict]) -> None:
    """summary.json (a list of rows) and summary.csv (columns in first-seen order) in `out`."""
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def run_sweep(target: str, grid: dict[str, list[str]], out: str | Path, *, params: dict[str, str] | None = None,
              jobs: int = 1, timeout: float | None = None, progress: bool = True,
              keep_unfinished: bool = False) -> list[dict]:  # fmt: skip
    """Run every grid point not already done (see the module docstring); returns the summary rows.

    keep_unfinished: a point that did not finish keeps its folder, so a command that resumes from it (such as
    `eval.ablation --resume`) continues where it stopped; by default it starts again from nothing."""
    from tqdm.auto import tqdm

    from .toy.cards import git_commit

    params = dict(params or {})
    if not grid:
        raise ValueError("the sweep needs at least one --grid key=v1,v2")
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    overlap = sorted(set(grid) & set(params))
    if overlap:
        raise ValueError(f"keys {overlap} are both --grid and --param")
    check_target(target, grid, params)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    points = grid_points(grid)
    sweep = {"target": target, "grid": grid, "params": params, "jobs": jobs, "timeout": timeout,
             "points": [p.name for p in points], "git_commit": git_commit(),
             "command": shlex.join([sys.executable, "-m", "hyperlora.sweep", *sys.argv[1:]])}  # fmt: skip
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    todo = [p for p in points if not (out / p.name / DONE).is_file()]
    if progress and len(todo) < len(points):
        print(f"[sweep] {len(points) - len(todo)} of {len(points)} points already done: skipped", flush=True)
    failed = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc="sweep", unit="point",
                                                              disable=not progress) as bar:  # fmt: skip
        futures = {pool.submit(run_point, target, p, params, out / p.name, timeout, keep_unfinished): p for p in todo}
        for future in as_completed(futures):
            status = future.result()
            failed += status["status"] == "failed"
            bar.set_postfix(failed=failed)
            bar.update()
            if progress and status["status"] == "failed":
                bar.write(f"[sweep] {futures[future].name} failed: {status['error']}")
    rows = [summary_row(p, out / p.name) for p in points]
    write_summary(out, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("target", help="a notebook (.ipynb) or a shell command template with {key} and {out}")
    parser.add_argument("--grid", action="append", default=[], required=True, help="key=v1,v2 (repeat for more keys)")
    parser.add_argument("--param", action="append", default=[], help="key=value, the same at every point")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's folder: one subfolder per point")
    parser.add_argument("--jobs", type=int, default=1, help="points run in parallel (processes)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per point before it is killed")
    args = parser.parse_args(argv)
    try:
        grid = parse_assignments(args.grid, "--grid", split=True)
        params = {k: v[0] for k, v in parse_assignments(args.param, "--param", split=False).items()}
        rows = run_sweep(args.target, grid, args.out, params=params, jobs=args.jobs, timeout=args.timeout)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = [row["point"] for row in rows if row["status"] != "done"]
    print(f"[sweep] {len(rows) - len(failed)} of {len(rows)} points done; wrote {args.out / 'summary.csv'}")
    if failed:
        print(f"[sweep] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
