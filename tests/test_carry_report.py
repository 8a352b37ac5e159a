"""`python -m eval.carry_report`: check-0 runs compared per person, with a figure and kept copies."""

import json

import pytest

from eval import carry_report


def write_run(folder, values: dict[int, dict[int, float]], guidance: float | None = None) -> None:
    """values: {person: {steps: id_sim_all}}, as eval.carry writes its results.json (`guidance`: None as before
    eval.carry recorded the scale)."""
    rows = [{"identity": person, "steps": steps, "id_sim_all": v, "id_sim_neutral": v + 0.1, "adherence": 0.8}
            for person, by_steps in values.items() for steps, v in by_steps.items()]  # fmt: skip
    if guidance is not None:
        rows = [{**r, "guidance": guidance} for r in rows]
    if (folder / "results.json").is_file():  # a second scale of the same run
        rows = json.loads((folder / "results.json").read_text())["rows"] + rows
    folder.mkdir(parents=True, exist_ok=True)
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


def test_a_run_scored_at_several_guidance_scales_is_one_arm_per_scale(tmp_path, capsys):
    write_run(tmp_path / "old", {1: {300: 0.2}, 2: {300: 0.4}})  # no scale recorded: the default, 5.0
    write_run(tmp_path / "run", {1: {300: 0.5}, 2: {300: 0.3}}, guidance=7.5)
    write_run(tmp_path / "run", {1: {300: 0.25}, 2: {300: 0.45}}, guidance=5.0)
    carry_report.main([f"old={tmp_path}/old", f"run={tmp_path}/run"])
    out = capsys.readouterr().out
    assert "| old | 300 | 2 | 0.300 |" in out
    assert out.index("| run g=5.0 | 300 | 2 | 0.350 |") < out.index("| run g=7.5 | 300 | 2 | 0.400 |")
    assert "run g=5.0 - old at 300 steps: +0.050 ± 0.000 over 2 people" in out
    assert "run g=7.5 - old at 300 steps: +0.100 ± 0.200 over 2 people" in out  # +0.3 and -0.1


@pytest.mark.parametrize("text, scales", [("5", [5.0]), ("3.5,5,7.5,5", [3.5, 5.0, 7.5])])
def test_guidance_scales_are_parsed(text, scales):
    from eval.carry import parse_guidance

    assert parse_guidance(text) == scales


@pytest.mark.parametrize("text, message", [("five", "comma-separated numbers"), ("0.5", "at least 1"),
                                           ("nan", "at least 1"), ("5,inf", "at least 1")])  # fmt: skip
def test_bad_guidance_scales_are_refused(text, message):
    from eval.carry import parse_guidance

    with pytest.raises(SystemExit, match=message):
        parse_guidance(text)


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
