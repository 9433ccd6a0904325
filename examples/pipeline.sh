#!/usr/bin/env bash
# clipcli in a shell pipeline: stdout is data (JSON Lines in a pipe), messages go to stderr.
# Usage: bash examples/pipeline.sh [MODEL]   (default: $CLIPCLI_MODEL or ViT-B/32)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
model=${1:-${CLIPCLI_MODEL:-ViT-B/32}}
out=${TMPDIR:-/tmp}/clipcli-example
mkdir -p "$out"

echo "== photos whose best label is 'cat'" >&2
clipcli classify "$here/images" -m "$model" --labels-file "$here/labels.txt" --quiet \
  | python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if r["status"] == "ok" and r["label"] == "cat":
        print(r["image"], round(r["score"], 3))'
# With jq installed the same filter is:  | jq -r 'select(.label=="cat") | .image'

echo "== the two best labels per photo, as CSV" >&2
clipcli classify "$here/images" -m "$model" --labels-file "$here/labels.txt" --top-k 2 --format csv --quiet

echo "== embeddings of every photo and every caption" >&2
clipcli encode "$here/images" -m "$model" -o "$out/images.npy" --overwrite
clipcli encode --text-file "$here/captions.txt" -m "$model" -o "$out/captions.npz" --overwrite

echo "== photos listed on stdin, similarity heatmap" >&2
ls "$here"/images/*.jpg "$here"/images/*.png \
  | clipcli similarity - "$here/captions.txt" -m "$model" -o "$out/heatmap.png" --overwrite
echo "outputs in $out" >&2
