#!/bin/bash
# The brain-subjects policy grid and corpus axis (2026-12-02 to 03), after the gate passed (E = 20 epochs per cell, at least 900 steps; chosen on validation):
#  1. the grid on the 60-subject set: 1 and 5 labelled subjects, five policies, 6 seeds paired by seed,
#     pretraining on the set's own 42 unlabelled training subjects;
#  2. the corpus axis: the same cells pretrained on 50, 200 and 1000 simulated subjects that share the 9 val and
#     9 test subjects of the 60-subject set (subject k is the same bytes in every set of one seed).
# Two processes on disjoint seeds (0-2 and 3-5); rerunning a command continues it; a last call over all seeds
# (--seeds 6, first seed 0) gathers the tables. GRID: a work folder; CODE: a checkout frozen for the whole grid, at
# d9534c0 or later (older code names DATA in --corpus by its folder and would rerun its cells).
# GRID/bs60-v2: `ahm data prepare brain-subjects --out GRID/bs60-v2` (the v2 defaults, 60 subjects).
# The grid folder does not outlive the machine: the finished cells' records are kept in the repository
# (brain-subjects-cells/, `restore.py`): `load` them into GRID first (their cells are kept, not rerun), and `save`
# new ones after each stage (commit them). On 2026-12-02 the records of the first 110 cells were rebuilt from the gathered CSVs.
set -e
run() { PYTHONPATH=$CODE/src nice -n 19 ahm "$@"; }
KEEP="python3 $(cd "$(dirname "$0")" && pwd)/brain-subjects-cells/restore.py"  # this checkout's records
$KEEP load $GRID/grid17
for N in 50 200 1000; do   # N unlabelled training subjects + the same 9 val and 9 test subjects
  [ -f $GRID/corpus$N/brain_subjects.json ] || run data prepare brain-subjects --subjects $((N + 18)) \
    --val-subjects 9 --test-subjects 9 --out $GRID/corpus$N
done
COMMON="--finetune-epochs 20 --finetune-steps 900 --pretrain-steps 1000 --config experiments/grid-unet.yaml"
for FIRST in 0 3; do
  run bench curve $GRID/bs60-v2 --labels 1,5 --policies scratch,random,ahm-official,ahm,hpm --seeds 3 \
    --first-seed $FIRST $COMMON --out $GRID/grid17 &
done
wait
$KEEP save $GRID/grid17
# The corpus axis, the endpoints first (random and ahm on the 1000-subject corpus), then the rest. Cells are
# named by corpus, so the order of --corpus and --policies changes only which cells run first.
CORPORA=$GRID/bs60-v2,$GRID/corpus1000,$GRID/corpus200,$GRID/corpus50   # bs60-v2 (42): the cells above, kept
for FIRST in 0 3; do
  ( run bench curve $GRID/bs60-v2 --labels 1,5 --policies random,ahm --seeds 3 --first-seed $FIRST \
      --corpus $GRID/bs60-v2,$GRID/corpus1000 $COMMON --out $GRID/grid17
    run bench curve $GRID/bs60-v2 --labels 1,5 --policies random,ahm,ahm-official,hpm --seeds 3 --first-seed $FIRST \
      --corpus $CORPORA $COMMON --out $GRID/grid17 ) &
done
wait
$KEEP save $GRID/grid17
run bench curve $GRID/bs60-v2 --labels 1,5 --policies scratch,random,ahm-official,ahm,hpm --seeds 6 \
  --corpus $CORPORA $COMMON --out $GRID/grid17 --gather  # gathers: results.{md,csv,png} over every corpus and seed
# held-out reconstruction of every pretraining run, on the 9 validation subjects every corpus shares
run bench recon $GRID/grid17/pretrain/* --data $GRID/bs60-v2 --split val --out $GRID/recon-val.json --force
