#!/usr/bin/env bash
# The offline demo: synthetic MedMNIST-format data for all 12 datasets, then the TSM stage, then its test table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
VITASK=.venv/bin/vitask
DATA=data/synthetic
RUN=runs/demo

# Files are written atomically in flag order, so the last one present means all are.
[ -f "$DATA/organsmnist.npz" ] || "$VITASK" data synth --root "$DATA"

"$VITASK" fit --config configs/tsm.yaml --config configs/offline/tsm.yaml --trainer.default_root_dir "$RUN/tsm"
ckpt=$(ls -t "$RUN"/tsm/lightning_logs/*/checkpoints/best-*.ckpt | head -1)
"$VITASK" test --config configs/tsm.yaml --config configs/offline/tsm.yaml --trainer.default_root_dir "$RUN/tsm" \
  --ckpt_path "$ckpt"
echo "TSM checkpoint: $ckpt"
