#!/bin/bash
# The ahm-official grid of 2026-12-01/02: brain-demo --shift, UNet, 10% labels; one seed per call so paired seeds accumulate (resumable).
# The code is frozen at the commit that ran seeds 0-1 (/work/grid-code, a09c78a), so that work on main cannot change or break a running grid.
# usage: run-shift-seeds.sh SEED... ; two of these on disjoint seeds share the 2 cores (each cell runs 1 thread)
# GRID: the folder of the grids (brain-shift from `ahm data prepare brain-demo --shift`); CODE: a checkout of a09c78a.
for s in "$@"; do
  PYTHONPATH=$CODE/src nice -n 19 ahm bench compare $GRID/brain-shift --backbones unet \
    --policies scratch,random,ahm,ahm-official --first-seed $s --seeds 1 --labels-fraction 0.1 \
    --pretrain-steps 1000 --finetune-steps 900 --config experiments/grid-unet.yaml \
    --out $GRID/cmp-shift-unet
done
