#!/bin/bash
# $1 checkpoint, $2 out, then extra eval.run args: the session-15 test at weight 2.5
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
ck=$1; out=$2; shift 2
python -m eval.run --world toy --methods hyperlora,hyperlora_other --checkpoint $ck --num-identities 4 \
  --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 2.5 --out $out "$@"
