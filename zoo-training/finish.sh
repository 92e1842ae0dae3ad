#!/bin/bash
# Finish a zoo run (issue 10): evaluate it on the whole test set into its card, then move its weights to
# models/zoo/ and its log to models/zoo/logs/ and delete its state file. Refuses while the run is still
# training or short of its epochs, so a half-trained model never reaches the zoo. `--stopped` ships a run that
# stopped short of its plan at an epoch boundary (the paper's 3,280-epoch schedule, run as far as time allowed):
# its card's epochs and schedule say how far it got. `--as ZOONAME` ships it under another name (its card's name too),
# for a run named for how it was trained (mnist-iwae-k50-2l-paper) that takes the place of the zoo's model.
# usage: zoo-training/finish.sh NAME [--stopped] [--as ZOONAME] [EVAL ARGS...]   (eval args go to `iwae eval`)
set -euo pipefail
name=$1; shift
stopped=0
if [[ ${1:-} == --stopped ]]; then stopped=1; shift; fi
dest=$name
if [[ ${1:-} == --as ]]; then
  [[ ${2:-} =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "finish.sh: --as needs a model name ([A-Za-z0-9._-])" >&2; exit 2; }
  dest=$2; shift 2
fi
here="$(cd "$(dirname "$0")" && pwd)"
repo="${IWAE_REPO:-$(dirname "$here")}"
zoo="${IWAE_ZOO:-$repo/models/zoo}"
py="${IWAE_PYTHON:-$repo/.venv/bin/python}"
ckpt="$here/$name.safetensors" log="$here/$name.log.jsonl" state="$here/$name.state.safetensors"
for f in "$ckpt" "$log"; do [[ -f $f ]] || { echo "finish.sh: no $f" >&2; exit 2; }; done
if pgrep -f -- "--out $ckpt" >/dev/null; then
  echo "finish.sh: $name is still training (pgrep -f -- '--out $ckpt')" >&2; exit 2
fi
cd "$repo"  # the inline Python below imports the project
# The trainer writes the log line after the checkpoint of that epoch, so the two agree on a finished run.
# A continuation of the zoo's own NAME (extend.sh: init_from is NAME) extends that model's zoo log below.
read -r done_epochs planned continues boundary < <("$py" - "$ckpt" "$log" "$dest.safetensors" "$zoo/logs/$dest.log.jsonl" <<'EOF'
import json, sys
from pathlib import Path
from models.checkpoint import parse_card, read_metadata
from training.checkpoints import read_bytes, read_train_state_meta, state_path
ckpt, log, own, zoo_log = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
state = state_path(ckpt)
card = parse_card(read_metadata(read_bytes(ckpt), str(ckpt)), str(ckpt))
last = json.loads(log.read_text().splitlines()[-1])["epoch"]
continues = (card.get("init_from") or {}).get("from") == own and zoo_log.exists()
# Weights saved mid-epoch are ahead of the card's epoch count: only an epoch boundary can be shipped stopped.
meta = read_train_state_meta(state) if state.exists() else {"epoch": card["epochs"], "step": 0}
boundary = meta["step"] == 0 and meta["epoch"] == card["epochs"] == last
print(min(card["epochs"], last), card["schedule"]["epochs"], int(continues), int(boundary))
EOF
)
if (( done_epochs < planned )); then
  if (( ! stopped )); then
    echo "finish.sh: $name has $done_epochs of $planned epochs; resume it (zoo-training/run.sh or extend.sh)," \
      "or ship it as it is with --stopped" >&2; exit 2
  fi
  if (( ! boundary )); then
    echo "finish.sh: $name stopped mid-epoch or its log and checkpoint disagree; resume it to the end of" \
      "epoch $((done_epochs + 1)), then finish it with --stopped" >&2; exit 2
  fi
fi
OMP_NUM_THREADS=1 "$py" -m "${IWAE_CLI_MODULE:-iwae_cli}" eval "$ckpt" --k 5000 --split test \
  --update-card --quantiles --threads 1 --no-progress "$@"
if [[ $dest != "$name" ]]; then
  # The zoo, the results table and the figures find a model's log and Table 1 row by the card's name.
  "$py" -c 'import sys, pathlib, training.checkpoints as c; c.update_card(pathlib.Path(sys.argv[1]), {"name": sys.argv[2]})' \
    "$ckpt" "$dest"
fi
mkdir -p "$zoo/logs"
if (( continues )); then
  # Appended to the log of the run it continued, numbered on from it ("run_epoch" keeps its own count), so the
  # log and the training curves cover the whole training.
  "$py" - "$log" "$zoo/logs/$dest.log.jsonl" <<'EOF'
import json, sys
from pathlib import Path
from training.files import atomic_write_bytes
log, zoo_log = Path(sys.argv[1]), Path(sys.argv[2])
before = zoo_log.read_text()
offset = json.loads(before.splitlines()[-1])["epoch"]
records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
added = "".join(json.dumps(r | {"epoch": r["epoch"] + offset, "run_epoch": r["epoch"]}) + "\n" for r in records)
atomic_write_bytes(zoo_log, (before + added).encode())
EOF
  rm "$log"
else
  mv "$log" "$zoo/logs/$dest.log.jsonl"
fi
mv "$ckpt" "$zoo/$dest.safetensors"
rm -f "$state"
echo "finish.sh: $name is in $zoo as $dest. Next: iwae reproduce results --out-dir models/zoo;" \
  "iwae reproduce figures --out-dir models/zoo --figures docs/figures; the README's table."
