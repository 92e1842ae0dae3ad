#!/bin/bash
# Finish a zoo run (issue 10): evaluate it on the whole test set into its card, then move its weights to
# models/zoo/ and its log to models/zoo/logs/ and delete its state file. Refuses while the run is still
# training or short of its epochs, so a half-trained model never reaches the zoo.
# usage: zoo-training/finish.sh NAME [EVAL ARGS...]   (extra args go to `iwae eval`, after the defaults)
set -euo pipefail
name=$1; shift
here="$(cd "$(dirname "$0")" && pwd)"
repo="${IWAE_REPO:-$(dirname "$here")}"
zoo="${IWAE_ZOO:-$repo/models/zoo}"
py="${IWAE_PYTHON:-$repo/.venv/bin/python}"
ckpt="$here/$name.safetensors" log="$here/$name.log.jsonl" state="$here/$name.state.safetensors"
for f in "$ckpt" "$log"; do [[ -f $f ]] || { echo "finish.sh: no $f" >&2; exit 2; }; done
if pgrep -f -- "--out $ckpt" >/dev/null; then
  echo "finish.sh: $name is still training (pgrep -f -- '--out $ckpt')" >&2; exit 2
fi
# The trainer writes the log line after the checkpoint of that epoch, so the two agree on a finished run.
read -r done_epochs planned < <("$py" - "$ckpt" "$log" <<'EOF'
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    card = json.loads(f.metadata()["card"])
last = json.loads(open(sys.argv[2]).read().splitlines()[-1])["epoch"]
print(min(card["epochs"], last), card["schedule"]["epochs"])
EOF
)
if (( done_epochs < planned )); then
  echo "finish.sh: $name has $done_epochs of $planned epochs; resume it (zoo-training/run.sh or extend.sh)" >&2; exit 2
fi
cd "$repo"
OMP_NUM_THREADS=1 "$py" -m "${IWAE_CLI_MODULE:-iwae_cli}" eval "$ckpt" --k 5000 --split test \
  --update-card --quantiles --threads 1 --no-progress "$@"
mkdir -p "$zoo/logs"
# A continuation of the zoo's own NAME (extend.sh) appends its epochs to the log of the run it continued,
# numbered on from it ("run_epoch" keeps its own count), so the log and the curves cover the whole training.
"$py" - "$ckpt" "$log" "$zoo/logs/$name.log.jsonl" "$name.safetensors" <<'EOF'
import json, sys
from pathlib import Path
from safetensors import safe_open
ckpt, log, zoo_log, own = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
with safe_open(ckpt, "pt") as f:
    init = json.loads(f.metadata()["card"]).get("init_from") or {}
if init.get("from") == own and zoo_log.exists():
    before = zoo_log.read_text()
    offset = json.loads(before.splitlines()[-1])["epoch"]
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    records = [r | {"epoch": r["epoch"] + offset, "run_epoch": r["epoch"]} for r in records]
    zoo_log.write_text(before + "".join(json.dumps(r) + "\n" for r in records))
    log.unlink()
EOF
mv "$ckpt" "$zoo/$name.safetensors"
if [[ -f $log ]]; then mv "$log" "$zoo/logs/$name.log.jsonl"; fi
rm -f "$state"
echo "finish.sh: $name is in $zoo. Next: iwae reproduce results --out-dir models/zoo;" \
  "iwae reproduce figures --out-dir models/zoo --figures docs/figures; the README's table."
