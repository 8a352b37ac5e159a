"""Val people 0-5, seed 0: the reference, then per prompt zero-shot | coefficients fitted (coef_ft@100) | free rank-8 LoRA (zero_ft@300).

python docs/ablations/bases_reach16/figure.py OUT.png  (reads the eval.run image folders under runs/)
python docs/ablations/bases_reach16/figure.py OUT.png "LABEL=RUN:VARIANT" ...  (other columns, same people)
    --people A:B    the runs' people A..B-1 (default 0:6; their rows of the first run's grid)
    --train         training people (image names are their ids; val people's are 900000 + index)
    --test          test people (1000000 + index)
"""

import sys

import matplotlib.pyplot as plt
from PIL import Image

RUNS = {
    "zero-shot": ("runs/targets/e_3500_val16", "hyperlora"),
    "coef_ft@100": ("runs/reach16/coefft_b1", "coef_ft@100"),
    "free LoRA@300": ("runs/reach16/zero_ft", "zero_ft@300"),
}
args = sys.argv[2:]
PEOPLE, ID_BASE, PROMPTS = range(6), 900000, (1, 5)
if "--people" in args:
    at = args.index("--people")
    start, end = map(int, args.pop(at + 1).split(":"))
    args.pop(at)
    PEOPLE = range(start, end)
SPLIT = "val"
if "--train" in args:
    args.remove("--train")
    ID_BASE, SPLIT = 0, "train"
if "--test" in args:
    args.remove("--test")
    ID_BASE, SPLIT = 1000000, "test"
if args:
    RUNS = {arg.split("=", 1)[0]: tuple(arg.split("=", 1)[1].rsplit(":", 1)) for arg in args}
CELL = 128  # the eval grids' cell: two references, a gap, then the generations

# an eval grid's first column holds each person's reference: the first column's run's grid
first_run, first_variant = next(iter(RUNS.values()))
grid = Image.open(f"{first_run}/grid_{first_variant.replace('@', '_')}.png")
fig, axes = plt.subplots(len(PEOPLE), 1 + len(RUNS) * len(PROMPTS), figsize=(14, 2 * len(PEOPLE)))
for row, person in zip(axes, PEOPLE):
    row[0].imshow(grid.crop((0, CELL * person, CELL, CELL * (person + 1))))
    column = 1
    for prompt in PROMPTS:
        for label, (run, variant) in RUNS.items():
            row[column].imshow(Image.open(f"{run}/images/{variant}/{ID_BASE + person}_p{prompt:02d}_s0.png"))
            if person == PEOPLE[0]:
                row[column].set_title(f"{label}\nprompt {prompt}", fontsize=9)
            column += 1
    row[0].set_ylabel(f"{SPLIT} {person}")
axes[0][0].set_title("reference", fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(sys.argv[1], dpi=60)
