"""eval.paired: pooling runs of one protocol and pairing every variant to one control."""

import json

import pytest

from eval.paired import main, paired_table, pooled_records, resolve_control


def write_run(folder, variants: dict[str, list[float]]):
    """A saved run: for each variant, one id_sim per (identity, prompt 0, seed 0), identities 0, 1, ..."""
    folder.mkdir(parents=True)
    rows = [
        {"variant": v, "identity": i, "prompt_index": 0, "seed_index": 0, "id_sim": x}
        for v, values in variants.items()
        for i, x in enumerate(values)
    ]
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_pools_runs_renames_variants_and_pairs_to_the_control(tmp_path):
    a = write_run(tmp_path / "a", {"hyperlora": [0.2, 0.1, 0.3], "coef_ft@300": [0.25, 0.1, 0.2]})
    b = write_run(tmp_path / "b", {"hyperlora": [0.2, 0.2, 0.2], "coef_ft@300": [0.5, 0.4, 0.6]})
    records = pooled_records([f"x={a}", f"y={b}"])
    control = resolve_control(records, "hyperlora")  # a bare name: the first run's
    assert control == "x hyperlora"
    table = {row["variant"]: row for row in paired_table(records, control)}
    assert list(table) == ["x hyperlora", "x coef_ft@300", "y hyperlora", "y coef_ft@300"]
    assert table["x hyperlora"]["gap"] is None
    assert table["x coef_ft@300"]["gap"]["mean"] == pytest.approx((0.05 + 0.0 - 0.1) / 3)
    assert table["y coef_ft@300"]["gap"]["mean"] == pytest.approx(0.3)
    assert table["y coef_ft@300"]["gap"]["identities_above_zero"] == 3
    assert table["y coef_ft@300"]["mean"] == pytest.approx(0.5)
    assert table["y hyperlora"]["gap"]["mean"] == pytest.approx(0.0)  # (0 + 0.1 - 0.1) / 3


def test_the_same_method_of_two_runs_pairs_by_its_full_name(tmp_path):
    g5 = write_run(tmp_path / "g5", {"zero_ft@300": [0.3, 0.4]})
    g3 = write_run(tmp_path / "g3", {"zero_ft@300": [0.4, 0.3]})
    records = pooled_records([f"g5={g5}", f"g3={g3}"])
    control = resolve_control(records, "g3 zero_ft@300")
    table = {row["variant"]: row for row in paired_table(records, control)}
    assert table["g5 zero_ft@300"]["gap"]["mean"] == pytest.approx(0.0)
    assert table["g5 zero_ft@300"]["gap"]["identities_above_zero"] == 1


def test_cli_prints_a_row_per_variant(tmp_path, capsys):
    a = write_run(tmp_path / "a", {"hyperlora": [0.2, 0.1], "zero_ft@300": [0.4, 0.2]})
    assert main([f"free={a}"]) == 0
    out = capsys.readouterr().out
    assert "| free zero_ft@300 | 2 | 0.300 | +0.150 ± 0.050 (2 of 2) |" in out


def test_refuses_bad_arguments(tmp_path):
    a = write_run(tmp_path / "a", {"zero_ft@300": [0.4]})
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):
        pooled_records([str(a)])
    with pytest.raises(SystemExit, match="no records.jsonl"):
        pooled_records([f"x={tmp_path / 'missing'}"])
    with pytest.raises(SystemExit, match="control variant 'hyperlora'"):
        resolve_control(pooled_records([f"x={a}"]), "hyperlora")


def test_looks_pair_per_image_from_the_attribute_judges_reading(tmp_path):
    from eval.paired import look_keys

    reference = {"hair_colour": "pink", "clothing_type": "hoodie", "expression": "neutral"}
    asked = {"hair_colour": "red", "expression": "neutral"}  # hair asked unlike the reference: the one eligible leak
    copied = look_keys({"predicted": {"hair_colour": "pink", "expression": "neutral"}, "prompt_attributes": asked,
                        "reference_attributes": reference})  # fmt: skip
    assert copied == {"adherence": 0.5, "leakage": 1.0}
    drawn = look_keys({"predicted": {"hair_colour": "red"}, "prompt_attributes": asked, "reference_attributes": reference})
    assert drawn == {"adherence": 0.5, "leakage": 0.0}  # the expression was not read: a miss, not a leak
    same = look_keys({"predicted": {}, "prompt_attributes": {"expression": "neutral"}, "reference_attributes": reference})
    assert same["adherence"] == 0.0 and same["leakage"] != same["leakage"]  # nothing eligible: NaN, skipped when paired
    assert look_keys({"id_sim": 0.3}) == {}  # no attribute judge (sdxl runs): no keys

    folder = write_run(tmp_path / "a", {"hyperlora": [0.2, 0.1], "base": [0.0, 0.0]})
    rows = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    for row in rows:  # hyperlora copies the reference's hair for both people, the base model draws the prompt's
        hair = "pink" if row["variant"] == "hyperlora" else "red"
        row.update(predicted={"hair_colour": hair}, prompt_attributes={"hair_colour": "red"},
                   reference_attributes={"hair_colour": "pink"})  # fmt: skip
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {row["variant"]: row for row in paired_table(pooled_records([f"x={folder}"]), "x base", "leakage")}
    assert table["x hyperlora"]["gap"]["mean"] == pytest.approx(1.0)
    assert table["x hyperlora"]["gap"]["identities_above_zero"] == 2
