#!/bin/bash
# The small 3D comparison (2026-12-02) (scratch, random, ahm; 3 seeds) on brain-subjects volumes (48^3 at 4 mm)
# usage: run-3d.sh FIRST_SEED SEEDS
# GRID/bs3d: `ahm data prepare brain-subjects --volumes --volume-size 48 --spacing 4 --subjects 30 --out GRID/bs3d`
nice -n 5 ahm bench compare GRID/bs3d --spatial-dims 3 --backbones unet \
  --policies scratch,random,ahm --first-seed $1 --seeds $2 --labels-fraction 0.1 \
  --pretrain-steps 400 --finetune-steps 400 --config experiments/grid-3d-cpu-small.yaml \
  --out GRID/cmp-3d
