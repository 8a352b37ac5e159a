"""`python -m hyperlora.toy.framing`: the face is larger in every render of the command it runs, and bad input is refused."""

import os
import subprocess
import sys

import pytest

from hyperlora.toy import framing, render


def face_width(size: int = 64) -> float:
    r = render.render(1000000, render.Look(), size)
    return float(r.box[2] - r.box[0])


def test_set_framing_scales_the_face_and_refuses_non_positive(monkeypatch):
    monkeypatch.setattr(render, "HEAD_SCALE", render.HEAD_SCALE)  # restored after the test
    before = face_width()
    framing.set_framing(1.3)
    assert face_width() == pytest.approx(1.3 * before, rel=0.05)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="> 0"):
            framing.set_framing(bad)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "hyperlora.toy.framing", *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env)


def test_cli_runs_the_module_with_the_framing(tmp_path):
    probe = tmp_path / "framing_probe.py"
    probe.write_text("import sys\nfrom hyperlora.toy import render\n"
                     "print(render.HEAD_SCALE, sys.argv[1:])\n")  # fmt: skip
    out = run("1.5", "framing_probe", "--x", "1", env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    scale, args = out.stdout.split(" ", 1)
    assert float(scale) == pytest.approx(render.HEAD_SCALE * 1.5)
    assert args.strip() == "['--x', '1']"
    assert "shipped models were trained at x1" in out.stderr


@pytest.mark.parametrize("args, message", [(("big", "eval.run"), "must be a number"),
                                           (("1.3", "no_such_module_here"), "no module"),
                                           (("1.3", "no_such_package.module"), "no module"),
                                           (("0", "eval.run"), "> 0")])  # fmt: skip
def test_cli_refuses_bad_input(args, message):
    out = run(*args)
    assert out.returncode != 0 and message in out.stderr
