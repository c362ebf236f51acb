#!/bin/bash
# The positive control: where does masked pretraining measurably beat training from scratch?
# ViT-Tiny/UNETR (grid-vit.yaml: 128 px, patch 16, batch 32) on the 60-subject brain-subjects set (42 training
# subjects), 1, 2 and 5 labelled subjects, scratch against random masking, pretraining budgets of 1,000, 3,000,
# 10,000 and 30,000 steps (each its own run with its own complete schedule), both protocols (finetune: every weight
# trains; frozen: only UNETR's decoder trains, scratch being the same network with a random frozen encoder), from
# the same pretraining runs. Two processes on disjoint seeds, the three seeds of the curve first (seeds 0-1 in one,
# seed 2 then seeds 3-5 in the other), each with one labelled subject and the smallest budget first, so a grid cut
# short has whole curves at its small budgets. Seeds 3-5 run only at DECIDE steps (default 30000, the largest):
# the verdict needs 6 paired seeds only at the point it decides, which is chosen on validation over the seeds
# every point has (0-2); where validation picks another budget, DECIDE=that runs its seeds 3-5 too.
# Rerunning continues it.
#   GRID: a work folder; GRID/bs60-v2 made by `ahm data prepare brain-subjects --out GRID/bs60-v2`.
#   CODE: a checkout frozen for the whole grid: a worktree at a6c450f plus only `bench curve --run-steps`
#   (`git worktree add CODE a6c450f && git -C CODE am run-steps.patch`, the patch beside this script; the cells
#   finished before 2026-12-08 ran on a6c450f itself); PY: a Python with ahm's dependencies (the .venv).
# The grid folder does not outlive the machine: `save` copies the finished cells' records (cell.json, and each
# pretraining run's summary.json) into cells/ beside this script, `load` puts them back into GRID before a rerun
# (`bench curve` keeps every cell it finds; a pretraining kept only as its summary is run again for the cells
# still to run).
set -e
: "${GRID:?set GRID}" "${CODE:?set CODE}"
PY=${PY:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$GRID/positive-control
run() { PYTHONPATH=$CODE/src nice -n 19 "$PY" -m ahm "$@"; }
save() { (cd "$OUT" && find cells -name cell.json; cd "$OUT" && find pretrain -maxdepth 2 -name summary.json 2>/dev/null) |
         while read -r f; do mkdir -p "$HERE/cells/$(dirname "$f")"; cp "$OUT/$f" "$HERE/cells/$f"; done; }
load() { [ -d "$HERE/cells" ] && (cd "$HERE/cells" && find . -name '*.json') | while read -r f; do
           [ -f "$OUT/$f" ] || { mkdir -p "$OUT/$(dirname "$f")"; cp "$HERE/cells/$f" "$OUT/$f"; }; done; true; }
COMMON=(--labels 1,2,5 --policies scratch,random --backbones vit --pretrain-steps 1000,3000,10000,30000
        --protocol finetune,frozen --finetune-epochs 20 --finetune-steps 900 --config "$HERE/../grid-vit.yaml"
        --out "$OUT")
case "${1:-run}" in
  save) save ;;
  load) load ;;
  gather) run bench curve "$GRID/bs60-v2" "${COMMON[@]}" --seeds 6 --gather ;;
  run)
    load
    # one labelled subject first (where the literature's gains are largest), every budget; then 2 and 5 labelled
    # subjects, whose cells reuse the same pretraining runs
    part() { run -q bench curve "$GRID/bs60-v2" "${COMMON[@]}" --labels 1 --seeds "$1" --first-seed "$2" "${@:3}" \
               > "$GRID/pc-$2.log" 2>&1 &&
             run -q bench curve "$GRID/bs60-v2" "${COMMON[@]}" --seeds "$1" --first-seed "$2" "${@:3}" \
               >> "$GRID/pc-$2.log" 2>&1; }
    part 2 0 &
    { part 1 2 && part 3 3 --run-steps "${DECIDE:-30000}"; } &
    wait
    save ;;
esac
