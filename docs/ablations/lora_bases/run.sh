#!/bin/bash
# Bases from per-person free LoRAs (eval.lora_bases), the measurement as it ran in session 20, one thread per job.
#   run.sh fit    two fits of 64 training people each (2,200 steps, side by side, about 1 h)
#   run.sh        bases, then the two lanes below
#   run.sh long   a longer fit of 8 people (2,200 steps: 8x the updates per person), scored the same way
set -e
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
R=runs/bases
FIT="python -m eval.lora_bases fit --checkpoint data/toy/hyperlora --steps 2200"
EV="python -m eval.run --world toy --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 1.0"
if [ "$1" = fit ]; then
  $FIT --people 0:64 --out $R/a > $R/a.log 2>&1 &
  $FIT --people 64:128 --out $R/b > $R/b.log 2>&1 &
  wait; exit
fi
if [ "$1" = long ]; then
  $FIT --people 0:8 --out $R/c > $R/c.log 2>&1
  python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras $R/c --out $R/c_k32
  $EV --checkpoint $R/c_k32/hyperlora --split train --num-identities 8 --methods coef_rows \
      --coefficient-table $R/c_k32 --out $R/rows_c > $R/rows_c.log 2>&1
  exit
fi
# bases: K = 32 and K = 128, with the last 16 fitted people held out (weight-space reach) and with all 128
for k in 32 128; do
  python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras $R/a $R/b --hyper-dim $k --held-out 16 --out $R/k${k}_h16
  python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras $R/a $R/b --hyper-dim $k --out $R/k$k
done
# lane 1: do the fitted free LoRAs carry their people? K = 128 holds all 128 exactly, K = 32 their leading part
# (the free LoRAs were fitted at ID weight 1.0; rows_k128_s2.5 is the same with --id-scale 2.5)
( $EV --checkpoint $R/k128/hyperlora --split train --num-identities 8 --methods coef_rows,base \
      --coefficient-table $R/k128 --out $R/rows_k128 > $R/rows_k128.log 2>&1
  $EV --checkpoint $R/k32/hyperlora --split train --num-identities 8 --methods coef_rows \
      --coefficient-table $R/k32 --out $R/rows_k32 > $R/rows_k32.log 2>&1 ) &
# lane 2: the resampler's readout refitted onto the K = 32 rows, then zero-shot and fitted coefficients on 16 val
# people (`eval.coefficient_targets distill` ran at 2.9 s a step on one thread, so the closed-form readout instead)
( python -m eval.lora_bases readout --checkpoint $R/k32/model --tables $R/k32 --out $R/k32_readout > $R/readout.log 2>&1
  $EV --checkpoint $R/k32_readout/hyperlora --split val --num-identities 16 --methods hyperlora,coef_ft \
      --dreambooth-steps 100,300 --finetune-lr 1e-2 --out $R/val16_k32 > $R/val16_k32.log 2>&1 ) &
wait
