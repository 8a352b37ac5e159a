"""Every numbered notebook executes headless at smoke size (papermill), and is committed clean."""

import json

import pytest

from hyperlora.notebooks import notebook_paths, run_notebook

NOTEBOOKS = notebook_paths()


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no numbered notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs_and_has_parameters(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), f"{path.name} has outputs"
    assert cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# "), "cell 1: a markdown title"
    assert "parameters" in cells[1].get("metadata", {}).get("tags", []), "cell 2: the papermill parameters cell"
    source = "".join(cells[1]["source"])
    assert "smoke =" in source and "out_dir =" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_size(path, tmp_path):
    executed = run_notebook(path, tmp_path, smoke=True)
    assert executed.is_file()
    assert any(p.suffix in (".png", ".json") for p in executed.parent.iterdir()), "the notebook wrote no results"
