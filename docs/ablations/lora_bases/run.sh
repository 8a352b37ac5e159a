#!/bin/bash
# Bases from per-person free LoRAs (eval.lora_bases), the whole measurement as it ran (session 20):
# two fits of 64 training people each (2,200 steps, one thread each, side by side), then bases, then two lanes.
set -e
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
R=runs/bases
if [ "$1" = fit ]; then
  for half in "a 0:64" "b 64:128"; do
    set -- $half
    python -m eval.lora_bases fit --checkpoint data/toy/hyperlora --people $2 --steps 2200 --out $R/$1 > $R/$1.log 2>&1 &
  done
  wait; exit
fi
# bases: K = 32 and K = 128, with the last 16 fitted people held out (weight-space reach) and with all 128
for k in 32 128; do
  python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras $R/a $R/b --hyper-dim $k --held-out 16 --out $R/k${k}_h16
  python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras $R/a $R/b --hyper-dim $k --out $R/k$k
done
EV="python -m eval.run --world toy --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 1.0"
# lane 1: do the fitted free LoRAs carry their people? K = 128 holds all 128 exactly, K = 32 their leading part
( $EV --checkpoint $R/k128/hyperlora --split train --num-identities 8 --methods coef_rows,base \
      --coefficient-table $R/k128 --out $R/rows_k128 > $R/rows_k128.log 2>&1
  $EV --checkpoint $R/k32/hyperlora --split train --num-identities 8 --methods coef_rows \
      --coefficient-table $R/k32 --out $R/rows_k32 > $R/rows_k32.log 2>&1 ) &
# lane 2: the resampler distilled onto the K = 32 rows, then zero-shot and fitted coefficients on 16 val people
( python -m eval.coefficient_targets distill --checkpoint $R/k32/model --tables $R/k32 --val-people 16 \
      --steps 3000 --out $R/k32_distilled > $R/distill.log 2>&1
  $EV --checkpoint $R/k32_distilled/hyperlora --split val --num-identities 16 --methods hyperlora,coef_ft \
      --dreambooth-steps 100,300 --finetune-lr 1e-2 --out $R/val16_k32 > $R/val16_k32.log 2>&1 ) &
wait
