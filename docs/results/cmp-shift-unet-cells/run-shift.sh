#!/bin/bash
# issue 13 grid: brain-demo --shift, UNet, 10% labels; one seed at a time so paired seeds accumulate (resumable)
for s in 0 1 2 3 4; do
  nice -n 19 /work/main/.venv/bin/ahm bench compare /work/grids/brain-shift --backbones unet \
    --policies scratch,random,ahm,ahm-official --first-seed $s --seeds 1 --labels-fraction 0.1 \
    --pretrain-steps 1000 --finetune-steps 900 --config /work/main/docs/results/grid-unet.yaml \
    --out /work/grids/cmp-shift-unet
done
