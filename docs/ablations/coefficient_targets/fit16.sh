#!/bin/bash
# per-person rows of training people 0-15 at learning rate $1, 600 steps (150 updates a person)
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
python -m eval.coefficient_targets fit --checkpoint runs/train/b10_catchup/snapshots/step-3500 --people 0:16 \
  --steps 600 --lr $1 --out runs/targets/p16_lr$1
