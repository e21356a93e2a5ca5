#!/usr/bin/env bash
# An operator's own classes, step by step with the product commands (issue 16): an image folder of natural photos
# (six scikit-image / scikit-learn scenes seen through random camera crops) -> train -> export (with the
# out-of-domain threshold) -> calibrate (int8, a new bundle) -> a local server -> the edge runtime streaming the test
# images as a camera would -> what the server stored. `taskcodec bench natural` runs the same chain and also measures
# JPEG/WebP at equal accuracy (bench/results/natural.md).
#
#   bash scripts/example-natural.sh [WORK_DIR]      (default runs/example-natural; about 3 minutes on 2 cores)
set -euo pipefail
WORK=${1:-runs/example-natural}
rm -rf "$WORK" && mkdir -p "$WORK"

python3 -c "from taskcodec.bench.natural import make_image_folder; make_image_folder('$WORK/scenes', per_class=100, size=128)"
taskcodec train --data "folder:$WORK/scenes" --image-size 64 --epochs 15 --beta 3e-4 --latent-dim 32 \
    --batch-size 64 --out "$WORK/run"
taskcodec export "$WORK/run" --out "$WORK/bundle"
taskcodec calibrate "$WORK/bundle" --out "$WORK/bundle-int8" --budget 1.0

# the camera: the test split's files (the 20 % of each class the trainer held out), one frame each
mkdir -p "$WORK/camera"
python3 - "$WORK" <<'EOF'
import shutil, sys
from taskcodec.data import _items, parse_data
work = sys.argv[1]
items, classes = _items(parse_data(f"folder:{work}/scenes"), "test")
with open(f"{work}/camera-labels.txt", "w") as f:
    for i, (path, label) in enumerate(items):
        shutil.copy(path, f"{work}/camera/{i:05d}{path.suffix}")
        f.write(f"{classes[label]}\n")
EOF

taskcodec serve --bundle "$WORK/bundle-int8" --db "$WORK/server.db" --port 0 --port-file "$WORK/port" \
    > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/port" ] && break; sleep 0.2; done
URL="http://127.0.0.1:$(cat "$WORK/port")"
taskcodec cameras add cam-natural --db "$WORK/server.db" > "$WORK/token"
chmod 600 "$WORK/token"
runtime capture --device "$WORK/camera" --bundle "$WORK/bundle-int8" --precision int8 --server "$URL" \
    --camera-id cam-natural --token-file "$WORK/token" --spool "$WORK/spool" --quiet --report "$WORK/capture.json"

taskcodec operators add example-reader --scope read --db "$WORK/server.db" | tail -n 1 > "$WORK/operator-key"
chmod 600 "$WORK/operator-key"
python3 - "$WORK" "$URL" <<'EOF'
import json, sys, urllib.request
work, url = sys.argv[1], sys.argv[2]
labels = open(f"{work}/camera-labels.txt").read().split()
key = open(f"{work}/operator-key").read().split()[-1]
request = urllib.request.Request(f"{url}/v1/cameras/cam-natural/frames?limit=10000",
                                 headers={"Authorization": f"Bearer {key}"})
with urllib.request.urlopen(request) as r:
    frames = sorted(json.load(r)["frames"], key=lambda f: f["seq"])
right = sum(f["class_name"] == labels[f["seq"]] for f in frames)
unknown = sum(f["class_name"] == "unknown" for f in frames)
size = sum(f["payload_bytes"] for f in frames) / max(1, len(frames))
print(f"server stored {len(frames)} frames: {right} right ({right / max(1, len(frames)):.2%}), {unknown} unknown, "
      f"{size:.2f} bytes per frame")
EOF
