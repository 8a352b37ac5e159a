#!/bin/bash
# Issue 17, item 3 (decoupling) at toy_fast's size: the look leakage of an ID-LoRA trained beside the Base-LoRA
# (toy_fast's stage 1, then its stage 3) against one trained without a Base-LoRA (stage 3 alone, has_base_lora
# false), same seed, the same 3,000 stage-3 steps, no identity-loss phase in either. One torch thread each.
#   run.sh train-with        toy_fast with seed 1 (runs/fast/v5s1; stop it after stage 3, or let its identity-loss
#                            phase run on: it is v5's second training seed)
#   run.sh train-without     python -m hyperlora.train --preset toy_fast --stages 3 --has-base-lora false --seed 1
#   run.sh eval NAME CHECKPOINT [METHODS] [BASE_SCALE]
#                            16 test people x all 20 prompts x 2 seeds at ID weight 1.5 -> runs/base_lora/NAME
#                            (METHODS default hyperlora; BASE_SCALE default 0, the ID-LoRA alone, as the release)
# Compare: python -m eval.paired "with=runs/base_lora/with" "without=runs/base_lora/without" --control "without hyperlora" --key leakage
# (the without run also scores the base model, the floor: --control "without base")
# The paper's single-image setting, the reference the target itself (--reference self), 1,000 steps a side:
#   run.sh self-with | self-without   (self-with starts from train-with's stage 1) -> runs/base_lora/self_ARM
#   run.sh eval-self ARM              16 test people x 20 prompts x 1 seed -> runs/base_lora/eval_self_ARM
set -e
cd "$(dirname "$0")/../../.." && source .venv/bin/activate
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
self=(--preset toy_fast --stage 3 --reference self --steps 1000 --seed 1 --threads 1 --cache-dir runs/fast/v5s1/cache --quiet)
case "$1" in
  train-with) bash docs/ablations/fast_schedule/run.sh train v5s1 toy_fast --seed 1 --threads 1 "${@:2}" ;;
  train-without) bash docs/ablations/fast_schedule/run.sh train v5s1_nobase toy_fast --stages 3 --has-base-lora false \
                   --seed 1 --threads 1 --cache-dir runs/fast/v5s1/cache "${@:2}" ;;
  eval)
    python -m eval.run --world toy --checkpoint "$3" --split test --num-identities 16 --seeds-per-prompt "${SEEDS:-2}" \
      --id-scale 1.5 --methods "${4:-hyperlora}" --base-scale "${5:-0}" --out runs/base_lora/"$2" ;;
  self-with) python -m hyperlora.train "${self[@]}" --init runs/fast/v5s1/stage1/model --out runs/base_lora/self_with "${@:2}" ;;
  self-without) python -m hyperlora.train "${self[@]}" --has-base-lora false --out runs/base_lora/self_without "${@:2}" ;;
  eval-self) SEEDS=1 bash docs/ablations/base_lora/run.sh eval eval_self_"$2" runs/base_lora/self_"$2"/hyperlora hyperlora,hyperlora_other ;;
  *) echo "usage: run.sh train-with|train-without [--resume] | eval NAME CHECKPOINT [METHODS] [BASE_SCALE]" \
          "| self-with|self-without [--resume] | eval-self with|without" >&2; exit 2 ;;
esac
