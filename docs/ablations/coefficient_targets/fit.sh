#!/bin/bash
# per-person ID coefficient rows over the scale-10 bases (b10_catchup step 3,500), two halves on one thread each
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
python -m eval.coefficient_targets fit --checkpoint runs/train/b10_catchup/snapshots/step-3500 --people $1 \
  --steps 1000 --lr 3e-2 --out runs/targets/$2
