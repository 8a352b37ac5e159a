#!/bin/bash
# Issue 17's 2.5-hour schedule (session 24-25): the toy_fast preset in one command on this 2-core machine, both
# threads to the one process, nothing else running, then the same held-out protocols as the shipped model.
#   run.sh train NAME [PRESET] [--resume]  python -m hyperlora.train --preset PRESET (toy_fast) -> runs/fast/NAME;
#                                   the wall clock goes to runs/fast/NAME.log ("start"/"end" lines, epoch seconds)
#   run.sh val NAME W               16 val people, prompts 0, 1, 5, 9 x 2 seeds at ID weight W (where W is chosen)
#   run.sh test NAME W              the same on the 16 test people (no choice is made there)
#   METHODS=... run.sh val|test     other methods (default hyperlora,hyperlora_other; the trigger-word check adds
#                                   hyperlora_no_trigger)
# The headline protocol (8 test people x 20 prompts x 4 seeds, five methods) is sampling_path/test_split.sh's:
#   HEADLINE=1 bash docs/ablations/sampling_path/test_split.sh NAME runs/fast/NAME/stage3-path/hyperlora W
set -e
cd /work/main && source .venv/bin/activate
export PYTHONPATH=/work/main
case "$1" in
  train)
    { echo "start $(date -u +%FT%TZ) $(date +%s)"
      rc=0; python -m hyperlora.train --preset "${3:-toy_fast}" --out runs/fast/"$2" --quiet "${@:4}" || rc=$?
      echo "end $(date -u +%FT%TZ) $(date +%s) rc=$rc"; } >> runs/fast/"$2".log 2>&1 ;;
  val|test)
    split=$1; [ "$1" = test ] || split=val
    OMP_NUM_THREADS=1 python -m eval.run --world toy --checkpoint runs/fast/"$2"/stage3-path/hyperlora --split $split \
      --num-identities 16 --prompts 0,1,5,9 --seeds-per-prompt 2 --id-scale "$3" --methods "${METHODS:-hyperlora,hyperlora_other}" \
      --out runs/fast/"$1"_"$2"_s"$3" ;;
  *) echo "usage: run.sh train NAME [PRESET] [--resume] | val NAME W | test NAME W" >&2; exit 2 ;;
esac
