"""`python -m eval.carry_report`: check-0 runs compared per person, with a figure and kept copies."""

import json

import pytest

from eval import carry_report


def write_run(folder, values: dict[int, dict[int, float]]) -> None:
    """values: {person: {steps: id_sim_all}}, as eval.carry writes its results.json."""
    rows = [{"identity": person, "steps": steps, "id_sim_all": v, "id_sim_neutral": v + 0.1, "adherence": 0.8}
            for person, by_steps in values.items() for steps, v in by_steps.items()]  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"args": {}, "rows": rows}))
    (folder / f"grid_{next(iter(values))}.png").write_bytes(b"png")


def test_report_pairs_people_pools_globs_and_keeps(tmp_path, capsys):
    write_run(tmp_path / "ref", {1: {0: 0.0, 300: 0.2}, 2: {0: 0.0, 300: 0.4}, 3: {0: 0.1, 300: 0.3}})
    write_run(tmp_path / "new_a", {1: {0: 0.0, 300: 0.3}})  # one person per run: pooled by the glob
    write_run(tmp_path / "new_b", {2: {0: 0.0, 300: 0.6}, 9: {0: 0.0, 300: 0.9}})  # 9: not in the reference
    figure, keep = tmp_path / "fig.png", tmp_path / "kept"
    carry_report.main([f"ref={tmp_path}/ref", f"new={tmp_path}/new_*", "--figure", str(figure),
                       "--keep", str(keep), "--grids"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| ref | 300 | 3 | 0.300 | 0.400 | 0.80 | 0.20, 0.40, 0.30 |" in out
    assert "| new | 300 | 3 | 0.600 |" in out  # 0.3, 0.6, 0.9 pooled from two folders
    assert "new - ref at 300 steps: +0.150 ± 0.050 over 2 people" in out  # +0.1 and +0.2 on people 1 and 2
    assert figure.stat().st_size > 0
    assert json.loads((keep / "new" / "new_b" / "results.json").read_text())["rows"][0]["identity"] == 2
    assert (keep / "ref" / "grid_1.png").is_file()
    # an arm read from where it is kept is left as it is (the report redrawn from docs/ with --keep docs/)
    carry_report.main([f"ref={keep}/ref", f"new={tmp_path}/new_*", "--keep", str(keep), "--grids"])
    assert json.loads((keep / "ref" / "results.json").read_text())["rows"][0]["identity"] == 1


@pytest.mark.parametrize("spec, message", [("noequals", "LABEL=FOLDER"), ("x=/no/such/dir", "no results.json")])
def test_bad_arms_are_refused(spec, message):
    with pytest.raises(SystemExit, match=message):
        carry_report.main([spec])


def test_varied_references_put_the_person_in_looks_of_their_own():
    from types import SimpleNamespace

    import numpy as np

    from eval.carry import varied_references
    from hyperlora.toy.render import render, sample_look

    world = SimpleNamespace(config=SimpleNamespace(seed=0, size=64))
    shared = np.stack([render(1000000, sample_look(np.random.default_rng(0)), 64).image] * 4)
    identity = {"id": 1000000, "images": shared}
    varied = varied_references(world, identity)
    assert varied.shape == shared.shape and np.array_equal(varied, varied_references(world, identity))
    corners = varied[:, :4, :4].reshape(4, -1).astype(int)  # background pixels: one look each
    assert len({tuple(c) for c in corners}) == 4
