#!/bin/bash
# Session 23: the sampling-path identity loss confirmed on the 16 test people (the split no choice was made on:
# ID weight 1.5, the path's weight and steps were all picked on the val people). Same protocol as run.sh eval.
#   test_split.sh NAME CHECKPOINT [ID_WEIGHT]   -> runs/path/test_NAME
# The headline protocol of the shipped model's card (8 test people x all 20 prompts x 4 seeds, five methods):
#   HEADLINE=1 test_split.sh NAME CHECKPOINT ID_WEIGHT   -> runs/path/headline_NAME
set -e
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
if [ -n "$HEADLINE" ]; then
  exec python -m eval.run --world toy --checkpoint "$2" --num-identities 8 --seeds-per-prompt 4 --id-scale "$3" \
    --methods hyperlora,hyperlora_other,hyperlora_no_trigger,base,renders --out runs/path/headline_"$1"
fi
python -m eval.run --world toy --checkpoint "$2" --split test --num-identities 16 --prompts 0,1,5,9 \
  --seeds-per-prompt 2 --id-scale "${3:-2.5}" --methods hyperlora,hyperlora_other --out runs/path/test_"$1"
