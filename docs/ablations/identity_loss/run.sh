#!/bin/bash
# An identity loss beside the diffusion loss (hyperlora/train/identity_loss.py; a departure from the paper), the
# measurement as it ran in session 21, one thread per job:
#   run.sh recognizer   a second toy recogniser on box crops, seed 1 (the loss's; the judge stays the shipped one)
#   run.sh control      1,000 more stage-3 steps from the shipped checkpoint, the paper's loss (lr 1e-4)
#   run.sh idloss W     the same with the identity loss at weight W
#   run.sh teachers     free LoRAs of training people 0-7 with the identity loss (weight 1.0, 2,200 steps, as
#                       session 20's long teachers `runs/bases/c`), their bases and their coef_rows at weight 1.0
#   run.sh eval NAME CK [W]  16 val people, prompts 0, 1, 5, 9 x 2 seeds, ID weight W (2.5): own and next
#                       person's references
set -e
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
R=runs/idloss
TRAIN="python -m hyperlora.train --preset toy --stage 3 --init data/toy/hyperlora --steps 1000 --lr 1e-4
  --warmup-steps 50 --train-groups id_basis,resampler_core,clip_path,arcface_path --cache-dir runs/train/cache
  --threads 1"
case "$1" in
  recognizer) python -m hyperlora.toy.faces --out $R/faces_box --stages recognizer --recognizer.crop '"box"' \
                --recognizer.seed 1 > $R/faces_box.log 2>&1 ;;
  control) $TRAIN --out $R/control > $R/control.log 2>&1 ;;
  idloss) $TRAIN --id-loss-weight "$2" --id-recognizer $R/faces_box/recognizer.safetensors --out $R/id_w$2 \
            > $R/id_w$2.log 2>&1 ;;
  eval) python -m eval.run --world toy --checkpoint "$3" --split val --num-identities 16 --prompts 0,1,5,9 \
          --seeds-per-prompt 2 --id-scale "${4:-2.5}" --methods hyperlora,hyperlora_other --out $R/eval_$2 \
          > $R/eval_$2.log 2>&1 ;;
  teachers)
    B=runs/bases
    python -m eval.lora_bases fit --checkpoint data/toy/hyperlora --cache runs/train/cache/train-62b5f0b2d4a48a9d \
      --people 0:8 --steps 2200 --id-loss-weight 1.0 --id-recognizer $R/faces_box/recognizer.safetensors \
      --out $B/c_id > $B/c_id.log 2>&1
    python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras $B/c_id --out $B/c_id_k32
    python -m eval.run --world toy --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 1.0 --checkpoint \
      $B/c_id_k32/hyperlora --split train --num-identities 8 --methods coef_rows --coefficient-table $B/c_id_k32 \
      --out $B/rows_c_id > $B/rows_c_id.log 2>&1 ;;
  *) echo "usage: run.sh recognizer | control | idloss W | teachers | eval NAME CHECKPOINT [ID_WEIGHT]" >&2; exit 2 ;;
esac
