"""Splits of the 2.5-hour schedule side by side, from their committed records (nothing is trained or sampled).

    python docs/ablations/fast_schedule/figure.py docs/figures/fast_schedule_splits.png v1 v2 v3 [v4 ...]

Four panels: stage 3's held-out gap (shuffled minus right reference) against step; the identity-loss phase's
identity term (1 - cosine, mean over 100 steps) and its held-out gap; ID similarity on the 16 test and 16 val people
after stage 3 alone and after the whole schedule. Each NAME is a folder under docs/ablations/fast_schedule holding
stage3/ and stage3-path/ and, where measured, the evaluations (test and val summaries; a split's missing ones are
left out of the last panel).
"""

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hyperlora.train.preview import read_log

HERE = Path(__file__).parent
# evaluation folders by what they measured; v1's were written by an earlier run.sh, hence other names
EVALS = {
    "test": ("test_s1.5", "test_fast_v1"),
    "val": ("val_s1.5",),
    "test, stage 3 only": ("test_{name}_nopath", "test_fast_v1_nopath"),
}


def id_similarity(folder: Path) -> float | None:
    """The hyperlora row's ID similarity in an evaluation folder's summary.json, None where there is none."""
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    rows = json.loads(summary.read_text())["rows"]
    return next(r["id_sim"] for r in rows if r.get("variant", r.get("method")) == "hyperlora")


def window_means(steps: list, values: list, width: int = 100) -> tuple[list, list]:
    """Means of `values` over consecutive windows of `width` steps, at each window's middle."""
    out_steps, out_values = [], []
    for start in range(0, int(max(steps)), width):
        chosen = [v for s, v in zip(steps, values) if start < s <= start + width and not math.isnan(v)]
        if chosen:
            out_steps.append(start + width / 2)
            out_values.append(sum(chosen) / len(chosen))
    return out_steps, out_values


def main(out_png: str, names: list[str]) -> None:
    fig, (gap3, term, gap_path, bars) = plt.subplots(1, 4, figsize=(18, 4))
    for name in names:
        split = HERE / name
        stage3 = read_log(split / "stage3")
        gap3.plot(stage3["val_step"], stage3["val_gap"], "o-", ms=3, label=name)
        path_dir = split / "stage3-path"
        if (path_dir / "log.jsonl").is_file():
            path = read_log(path_dir)
            term.plot(*window_means(path["step"], path["loss_id"]), label=name)
            if "val_step" in path:
                gap_path.plot(path["val_step"], path["val_gap"], "o-", ms=3, label=name)
    gap3.set(title="stage 3: held-out gap", xlabel="step", ylabel="val loss, shuffled - right reference")
    term.set(title="identity-loss phase: identity term", xlabel="step", ylabel="1 - cosine (mean over 100 steps)")
    gap_path.set(title="identity-loss phase: held-out gap", xlabel="step", ylabel="shuffled - right reference")
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        scores = []
        for candidates in EVALS.values():
            found = [id_similarity(HERE / name / c.format(name=name)) for c in candidates]
            scores.append(next((s for s in found if s is not None), float("nan")))
        bars.bar([k + i * width for k in range(len(EVALS))], scores, width, label=name)
    bars.set_xticks([k + 0.4 - width / 2 for k in range(len(EVALS))], list(EVALS), fontsize=8)
    bars.set(title="ID similarity, 16 people, ID weight 1.5", ylabel="ArcFace cosine to the person")
    for ax in (gap3, term, gap_path, bars):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    print(f"written to {out_png}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
