#!/bin/bash
# The decoupling term on sampled faces (`--id-decouple-weight`, session 25; a departure from the paper): does it
# keep the person behind the trigger words (no-trigger ID similarity 0.195 on the card's protocol, 0.054 before
# the identity loss) without losing the identity with them? Both arms continue the shipped model 500 stage-3 steps
# with the path identity loss (weight 0.3, 4 DDIM steps, lr 1e-4, as it was trained); one thread each.
#   run.sh branch NAME W    500 steps, decoupling weight W (0: the control) -> runs/decouple/NAME
#   run.sh branch-v5 NAME W [STEPS]  session 29: the same on the 2.5-hour schedule's v5 (toy_fast's identity-loss
#                           phase continued STEPS more, default 300: lr 1e-4 annealed, bases at 3x; needs
#                           runs/fast/v5 from `fast_schedule/run.sh train v5 ...`) -> runs/decouple/NAME
#   INIT=DIR run.sh branch-v5 ...  session 30: start elsewhere, e.g. v5's step 1,500 of its 1,800 (made with
#                           `python -m hyperlora.train.snapshot runs/fast/v5/stage3-path --step 1500 --dtype float32`):
#                           the decoupled steps replace the phase's last 300, so the schedule stays under 2.5 hours (about 2.31 h predicted, not timed)
#   run.sh eval NAME        16 val people, prompts 0, 1, 5, 9 x 2 seeds, ID weight 1.5, with and without trigger
#                           words and with the next person's references -> runs/decouple/eval_NAME
set -e
cd /work/main && source .venv/bin/activate
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main
case "$1" in
  branch)
    python -m hyperlora.train --preset toy --stage 3 --init data/toy/hyperlora --steps 500 --lr 1e-4 \
      --warmup-steps 50 --train-groups id_basis,resampler_core,clip_path,arcface_path --cache-dir runs/train/cache \
      --threads 1 --id-loss-weight 0.3 --id-loss-path-steps 4 --id-decouple-weight "$3" \
      --id-recognizer data/toy/id_recognizer/recognizer.safetensors --out runs/decouple/"$2" "${@:4}" ;;
  branch-v5)
    python -m hyperlora.train --preset toy_fast --stage 3-path --init "${INIT:-runs/fast/v5/stage3-path/model}" \
      --steps "${4:-300}" --warmup-steps 30 --cache-dir runs/fast/v5/cache --threads 1 --id-decouple-weight "$3" \
      --out runs/decouple/"$2" "${@:5}" ;;
  eval)
    python -m eval.run --world toy --checkpoint runs/decouple/"$2"/hyperlora --split val --num-identities 16 \
      --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale 1.5 --methods hyperlora,hyperlora_no_trigger,hyperlora_other \
      --out runs/decouple/eval_"$2" ;;
  *) echo "usage: run.sh branch NAME W [--resume] | branch-v5 NAME W [STEPS [--resume]] | eval NAME" >&2; exit 2 ;;
esac
