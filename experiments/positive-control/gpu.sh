#!/bin/bash
# The positive control's largest budget on one GPU: scratch and random masking, ViT-Tiny/UNETR as in run.sh
# (grid-vit.yaml), 30,000 pretraining steps, both protocols, 1/2/5 labelled subjects, seeds 0-5, each seed its own
# process (the model is small: six share the GPU). bf16-mixed on CUDA, so its figures are reported apart from the
# CPU grid's (float32). Resumable: rerunning continues the cells it finds.
#   bash experiments/positive-control/gpu.sh OUT [DATA]
#   OUT: a work folder; DATA: the 60-subject brain-subjects set (made in OUT when not given: the defaults of
#   `ahm data prepare brain-subjects` are the CPU grid's set). PY: a Python with ahm (default python3).
#   SMOKE=1: the same plumbing on the CPU in float32 at tiny budgets (20 pretraining steps, 10 fine-tuning steps,
#   1 labelled subject, seeds 0-1), to check the script without a GPU.
set -e
OUT=${1:?usage: gpu.sh OUT [DATA]}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
mkdir -p "$OUT"
DATA=${2:-$OUT/bs60-v2}
[ -f "$DATA/brain_subjects.json" ] || "$PY" -m ahm -q data prepare brain-subjects --out "$DATA"
if [ "${SMOKE:-0}" = 1 ]; then
  ACCEL=cpu PRECISION=32-true STEPS=20 FT=(--finetune-epochs 1 --finetune-steps 10) LABELS=1 SEEDS=2
else
  ACCEL=cuda PRECISION=bf16-mixed STEPS=30000 FT=(--finetune-epochs 20 --finetune-steps 900) LABELS=1,2,5 SEEDS=6
fi
# grid-vit.yaml on the device: its model, batch and learning rates; loader workers instead of one CPU thread
"$PY" - "$HERE/../grid-vit.yaml" "$OUT/grid-vit-device.yaml" "$ACCEL" "$PRECISION" <<'PYEOF'
import sys, yaml
src, dst, accel, precision = sys.argv[1:]
cfg = yaml.safe_load(open(src))
for section in ("pretrain", "finetune"):
    train = cfg[section].setdefault("train", {})
    train.pop("num_threads", None)
    train.update({"accelerator": accel, "precision": precision, "workers": 2})
yaml.safe_dump(cfg, open(dst, "w"), sort_keys=False)
PYEOF
COMMON=(--labels "$LABELS" --policies scratch,random --backbones vit --pretrain-steps "$STEPS"
        --protocol finetune,frozen "${FT[@]}" --config "$OUT/grid-vit-device.yaml" --out "$OUT/positive-control-gpu")
pids=()
for ((seed = 0; seed < SEEDS; seed++)); do
  "$PY" -m ahm -q bench curve "$DATA" "${COMMON[@]}" --seeds 1 --first-seed $seed > "$OUT/gpu-seed$seed.log" 2>&1 &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
"$PY" -m ahm bench curve "$DATA" "${COMMON[@]}" --seeds "$SEEDS" --gather > "$OUT/gpu-gather.log" 2>&1 || true
head -n 3 "$OUT/gpu-gather.log"
exit $failed
