"""The sweep runner on tiny commands and a two-cell notebook: failures recorded, others completed, done points skipped."""

import csv
import json
import sys

import nbformat
import pytest

from hyperlora.sweep import error_line, main, parse_assignments, parse_value, run_sweep

POINT = """
import json, pathlib, sys
x, out = int(sys.argv[1]), pathlib.Path(sys.argv[2])
here = pathlib.Path(__file__).parent
with open(here / "runs.txt", "a") as f:
    f.write(f"{x}\\n")
print(f"point x={x} running")
if x == 2 and not (here / "fixed").exists():
    raise ValueError("x=2 is not allowed")
(out / "summary.json").write_text(json.dumps({"y": 10 * x, "nested": {"z": x}, "curve": [1, 2]}))
"""


@pytest.fixture
def command(tmp_path):
    script = tmp_path / "point.py"
    script.write_text(POINT)
    return f"{sys.executable} {script} {{x}} {{out}}"


def runs(tmp_path) -> list[int]:
    return [int(line) for line in (tmp_path / "runs.txt").read_text().split()]


def test_a_failing_point_is_recorded_and_the_others_complete(command, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(command, {"x": ["1", "2", "3"]}, out, jobs=2, progress=False)
    assert [r["point"] for r in rows] == ["x=1", "x=2", "x=3"] and [r["x"] for r in rows] == [1, 2, 3]
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert rows[1]["error"] == "ValueError: x=2 is not allowed", "the error is the traceback's last line"
    assert [r.get("y") for r in rows] == [10, None, 30] and rows[0]["nested.z"] == 1 and "curve" not in rows[0]
    assert "Traceback" in (out / "x=2" / "log.txt").read_text(), "the failed point keeps its log"
    assert (out / "x=1" / "done").is_file() and not (out / "x=2" / "done").exists()
    config = json.loads((out / "x=3" / "config.json").read_text())
    assert config["values"] == {"x": 3} and config["command"].endswith(f"{out / 'x=3'}") and "git_commit" in config
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["done", "failed", "done"] and table[1]["error"].startswith("ValueError")
    assert json.loads((out / "summary.json").read_text()) == rows


def test_a_rerun_skips_the_points_that_are_done(command, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(command, {"x": ["1", "2", "3"]}, out, progress=False)
    assert sorted(runs(tmp_path)) == [1, 2, 3]
    (tmp_path / "fixed").touch()
    rows = run_sweep(command, {"x": ["1", "2", "3"]}, out, progress=False)
    assert sorted(runs(tmp_path)) == [1, 2, 2, 3], "only the failed point runs again"
    assert [r["status"] for r in rows] == ["done"] * 3 and rows[1]["y"] == 20 and rows[1]["error"] == ""
    log = (out / "x=2" / "log.txt").read_text()
    assert "running" in log and "Traceback" not in log, "a rerun starts from an empty folder"


def test_keep_unfinished_lets_a_resuming_command_continue_in_its_folder(tmp_path):
    """A command that counts its attempts in its folder: kept, the second attempt sees the first's file."""
    command = "echo {k} >> {out}/attempts && test $(wc -l < {out}/attempts) -ge 2"
    out = tmp_path / "sweep"
    for keep in (False, True):
        first = run_sweep(command, {"k": [str(keep)]}, out, progress=False, keep_unfinished=keep)
        again = run_sweep(command, {"k": [str(keep)]}, out, progress=False, keep_unfinished=keep)
        assert first[0]["status"] == "failed", "one attempt is not enough"
        assert again[0]["status"] == ("done" if keep else "failed"), "kept: the unfinished attempt's file stays"


def test_a_notebook_sweep_injects_the_values_and_collects_one_row_per_point(tmp_path):
    notebook = nbformat.v4.new_notebook()
    parameters = nbformat.v4.new_code_cell('a = 1  # swept\nb = "x"  # fixed\nout_dir = ""')
    parameters.metadata["tags"] = ["parameters"]
    body = nbformat.v4.new_code_cell(
        "import json, pathlib\n"
        'pathlib.Path(out_dir, "summary.json").write_text(json.dumps({"double": 2 * a, "b": b, "curve": [a]}))'
    )
    notebook.cells = [parameters, body]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(notebook, path)
    rows = run_sweep(str(path), {"a": ["1", "2.5"]}, tmp_path / "sweep", params={"b": "hello"}, jobs=2, progress=False)
    got = [(r["a"], r["double"], r["b"], r["status"]) for r in rows]
    assert got == [(1, 2, "hello", "done"), (2.5, 5.0, "hello", "done")], "values typed, parameters injected"
    assert (tmp_path / "sweep" / "a=2.5" / "nb.ipynb").is_file(), "the executed notebook is kept"


def test_a_point_past_its_timeout_is_killed_and_recorded(tmp_path):
    rows = run_sweep("sleep {s} && touch {out}/late", {"s": ["30"]}, tmp_path / "sweep", timeout=0.5, progress=False)
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "timed out after 0.5 s"
    assert not (tmp_path / "sweep" / "s=30" / "late").exists()


def test_parsing_and_checks_fail_before_anything_runs(tmp_path):
    texts = ["1e-4", "8", "True", "true", "adam", "null"]
    assert [parse_value(v) for v in texts] == [1e-4, 8, True, True, "adam", None]
    assert parse_assignments(["lr=1e-4, 3e-4", "k=8"], "--grid", split=True) == {"lr": ["1e-4", "3e-4"], "k": ["8"]}
    assert error_line("Traceback:\n  \x1b[31mKeyError\x1b[0m: 'x'\nsome cleanup\n") == "KeyError: 'x'"
    for bad in (["lr"], ["out=1"], ["lr=1,"]):
        with pytest.raises(ValueError):
            parse_assignments(bad, "--grid", split=True)
    with pytest.raises(ValueError, match=r"\['k'\] do not appear"):
        run_sweep("echo {lr} > {out}/x", {"lr": ["1"], "k": ["2"]}, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="neither"):
        run_sweep("echo {lr} {typo} > {out}/x", {"lr": ["1"]}, tmp_path / "s", progress=False)
    with pytest.raises(FileNotFoundError):
        run_sweep("missing.ipynb", {"a": ["1"]}, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists(), "nothing is written when the sweep is refused"


def test_the_command_line_exits_1_when_a_point_failed(command, tmp_path, capsys):
    assert main([command, "--grid", "x=1,2", "--out", str(tmp_path / "cli"), "--jobs", "2"]) == 1
    assert "failed: x=2" in capsys.readouterr().err
    assert main([command, "--grid", "x=1", "--out", str(tmp_path / "cli2")]) == 0
    assert main(["echo {out}", "--grid", "x=1", "--out", str(tmp_path / "cli3")]) == 2, "unused grid key: refused"
