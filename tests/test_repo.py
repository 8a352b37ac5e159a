"""The repository's own promises: one set of packages in pyproject.toml and environment.yml."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_and_pyproject_name_the_same_packages():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pip_names = {_name(r) for r in pyproject}
    conda_names = {_name(r) for r in conda if not r.startswith("-e")}
    conda_names = {"onnxruntime" if n == "onnxruntime-gpu" else n for n in conda_names}
    assert pip_names == conda_names
    assert "onnxruntime-gpu" in (ROOT / "environment.yml").read_text()
    assert not re.search(r"^\s+- onnxruntime==", (ROOT / "environment.yml").read_text(), re.M), "never both onnxruntimes"


def test_versions_agree():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = (ROOT / "environment.yml").read_text()
    for requirement in pyproject:
        pinned = requirement.replace("onnxruntime==", "onnxruntime-gpu==")
        assert pinned in env, f"{requirement} is not pinned the same way in environment.yml"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
    assert "bash scripts/demo.sh" in readme
