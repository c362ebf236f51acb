#!/usr/bin/env bash
# The scratch label-efficiency gate on the simulated brain-subjects set (issue 17): a scratch UNet with the grid's
# fine-tuning recipe (docs/results/grid-unet.yaml, 900 steps), test Dice with 1, 2, 5, 20 and all labelled training
# subjects, 3 seeds each. Resumable: a cell with eval/test/metrics.json is kept, a started one is resumed.
#   docs/results/brain-subjects-gate.sh DATA OUT        (SEEDS="0 1 2" SUBJECTS="2 all 1 5 20" AHM=ahm to change)
# The 2-subject and all-label cells run first: they decide the gate (all - 2 subjects >= 0.08 test Dice).
set -euo pipefail
DATA=${1:?usage: brain-subjects-gate.sh DATA OUT}
OUT=${2:?usage: brain-subjects-gate.sh DATA OUT}
SEEDS=${SEEDS:-"0 1 2"}
SUBJECTS=${SUBJECTS:-"2 all 1 5 20"}
AHM=${AHM:-ahm}
CONFIG=${CONFIG:-$(dirname "$0")/grid-unet.yaml}
for n in $SUBJECTS; do
  for s in $SEEDS; do
    cell="$OUT/s$n-seed$s"
    [ -f "$cell/eval/test/metrics.json" ] && continue
    if [ "$n" = all ]; then budget=(--labels-fraction 1); else budget=(--labels-subjects "$n"); fi
    if [ ! -f "$cell/summary.json" ]; then
      resume=(); [ -e "$cell" ] && resume=(--resume)
      echo "$(date -u +%H:%M:%S) finetune $cell"
      $AHM --quiet finetune "$DATA" --init none --model unet "${budget[@]}" --steps 900 --seed "$s" \
        --config "$CONFIG" --out "$cell" "${resume[@]}"
    fi
    $AHM --quiet evaluate "$cell" --data "$DATA" --split test
  done
done
