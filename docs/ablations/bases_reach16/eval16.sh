#!/bin/bash
# 16 val people, the session-15 test (prompts 0,1,5,9 x 2 seeds, weight 2.5): $1 checkpoint, $2 out, then method args
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
ck=$1; out=$2; shift 2
python -m eval.run --world toy --checkpoint $ck --split val --num-identities 16 \
  --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 2.5 --out $out "$@"
