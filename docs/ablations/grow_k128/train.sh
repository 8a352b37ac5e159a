#!/bin/bash
# The shipped checkpoint grown to K = 128 (python -m hyperlora.train.grow data/toy/hyperlora --hyper-dim 128
# --out runs/train/grow_k128/init), then session 16's scale-10 branch on it: 2,000 stage-3 steps, bases at 10x.
# Rerun to resume.
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
python -m hyperlora.train --preset toy --stage 3 --init runs/train/grow_k128/init --hyper-dim 128 --steps 2000 \
  --train-groups id_basis,resampler_core,clip_path,arcface_path --basis-lr-scale 10 --out runs/train/grow_k128/run \
  --cache-dir runs/train/toy_v1/cache --threads 1 --quiet --resume
