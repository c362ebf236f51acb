#!/bin/bash
# The brain-subjects gate (2026-12-02) with a budget that grows with the labelled set: E epochs per cell, at least 900 steps; E on validation.
# Code frozen at a checkout ($CODE) so that later work on main cannot change a running grid.
# GRID/bs60-v2: `ahm data prepare brain-subjects --out GRID/bs60-v2` (the v2 defaults, 60 subjects).
for E in 20 40; do
  PYTHONPATH=$CODE/src nice -n 19 ahm bench curve $GRID/bs60-v2 --labels 2,all \
    --policies scratch --seeds 3 --finetune-epochs $E --finetune-steps 900 \
    --config experiments/grid-unet.yaml --out $GRID/gate-v2-ep$E
done
