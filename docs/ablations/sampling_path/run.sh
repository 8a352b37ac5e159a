#!/bin/bash
# The identity loss on faces sampled from pure noise (PuLID's form; hyperlora/train/identity_loss.py, a departure
# from the paper), the measurement as it ran in session 22, one thread per job. It needs session 21's box
# recogniser and identity-loss teachers (docs/ablations/identity_loss/run.sh recognizer, teachers):
#   run.sh teachers N OUT   continue those teachers (people 0-7, 2,200 steps) to 2,500 steps with the identity loss
#                           read on N-step sampling paths (N = 0: its one-step form, the control)
#   run.sh rows OUT         their K = 32 bases and coef_rows on the 8 people, ID weight 1.0
#   run.sh branch NAME N W [V J]  500 more stage-3 steps from the shipped checkpoint, path identity loss N steps,
#                           weight W, its cosine averaged over V random views of jitter J (session 23; default 1, 0)
#   run.sh eval NAME CK [W] 16 val people, prompts 0, 1, 5, 9 x 2 seeds, ID weight W (2.5)
set -e
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
R=runs/path
REC=runs/idloss/faces_box/recognizer.safetensors
case "$1" in
  teachers)
    mkdir -p "$3" && cp -rn runs/bases/c_id/. "$3"/
    python -m eval.lora_bases fit --checkpoint data/toy/hyperlora --cache runs/train/cache/train-62b5f0b2d4a48a9d \
      --people 0:8 --steps 2500 --id-loss-weight 1.0 --id-recognizer $REC --id-loss-path-steps "$2" --out "$3" ;;
  rows)
    python -m eval.lora_bases bases --checkpoint data/toy/hyperlora --loras "$2" --out "$2"_k32
    python -m eval.run --world toy --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 1.0 --checkpoint \
      "$2"_k32/hyperlora --split train --num-identities 8 --methods coef_rows --coefficient-table "$2"_k32 \
      --out "$2"_rows ;;
  branch)
    python -m hyperlora.train --preset toy --stage 3 --init data/toy/hyperlora --steps 500 --lr 1e-4 \
      --warmup-steps 50 --train-groups id_basis,resampler_core,clip_path,arcface_path --cache-dir runs/train/cache \
      --threads 1 --id-loss-weight "$4" --id-loss-path-steps "$3" --id-recognizer $REC \
      --id-loss-views "${5:-1}" --id-loss-jitter "${6:-0}" --out $R/$2 ;;
  eval) python -m eval.run --world toy --checkpoint "$3" --split val --num-identities 16 --prompts 0,1,5,9 \
          --seeds-per-prompt 2 --id-scale "${4:-2.5}" --methods hyperlora,hyperlora_other --out $R/eval_$2 ;;
  *) echo "usage: run.sh teachers N OUT | rows OUT | branch NAME N W [V J] | eval NAME CHECKPOINT [ID_WEIGHT]" >&2; exit 2 ;;
esac
