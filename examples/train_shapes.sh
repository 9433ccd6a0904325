#!/usr/bin/env bash
# Train a tiny CLIP on synthetic coloured shapes on the CPU, then classify held-out shapes
# zero-shot with the saved checkpoint and print the accuracy (chance is 1/12 = 8%).
#
#   examples/train_shapes.sh [WORKDIR] [extra clipcli train options, e.g. --image-encoder mixer --text-encoder mixer]
set -euo pipefail

work="${1:-shapes-demo}"
shift || true
python="${PYTHON:-python}"

"$python" -m clipcli.train.shapes "$work/data" --train 1200 --test 240
labels="$("$python" -c 'from clipcli.train import shapes; print(",".join(shapes.classes()))')"

OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" clipcli train \
    --train-data "$work/data/train.csv" --val-data "$work/data/val.csv" --zeroshot-dir "$work/data/zeroshot" \
    --arch tiny --epochs 6 --batch-size 64 --lr 1e-3 --warmup 10 --workers 0 \
    --output "$work/run" --overwrite "$@"

clipcli classify "$work/data/zeroshot" --model "$work/run/last.safetensors" --labels "$labels" \
    --device cpu --format jsonl --quiet \
| "$python" -c '
import json, sys
from pathlib import Path
records = [json.loads(line) for line in sys.stdin]
right = sum(Path(r["image"]).parent.name.replace("_", " ") == r["label"] for r in records)
print(f"zero-shot accuracy: {right}/{len(records)} = {right / len(records):.1%} (chance {1 / 12:.1%})")
'
