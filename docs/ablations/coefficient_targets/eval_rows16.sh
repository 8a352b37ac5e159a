#!/bin/bash
# rows fitted at lr $1 (people 0-15) on training people 0-3
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
python -m eval.run --world toy --methods coef_rows --coefficient-table runs/targets/p16_lr$1 \
  --checkpoint runs/train/b10_catchup/snapshots/step-3500 --num-identities 4 --split train \
  --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 2.5 --out runs/targets/e_rows16_lr$1
