#!/usr/bin/env bash
# Smoke test of the container: build it through compose.yaml, bring it up, wait for the healthcheck, call
# /readyz, POST /loglik (a real MNIST test digit) and GET /sample, stop it with SIGTERM and check that it exits 0;
# everything is torn down on exit (the torch.compile cache volume is kept unless --purge: it is meant to persist).
#
#   docker/smoke.sh [--base-image IMAGE] [--torch-index URL] [-f EXTRA_COMPOSE_FILE]... [--cold] [--purge]
#
#   --base-image   build argument BASE_IMAGE (env IWAE_BASE_IMAGE; default python:3.12-slim, from compose.yaml)
#   --torch-index  build argument TORCH_INDEX_URL (env IWAE_TORCH_INDEX_URL; default the PyTorch CPU index)
#   -f FILE        an extra compose file after compose.yaml (e.g. compose.gpu.yaml, or a sandbox override)
#   --cold         remove the compile cache volume first (a first start, as on a new host)
#   --purge        also remove the compile cache volume and the image at the end
#
# Needs docker with compose (v2 `docker compose` or v1 `docker-compose`), curl and python3 on the host.
# Prints the build time, the time from `up` to ready and to healthy, the image size and the exit code.
# Not part of `make test` (it needs a Docker engine); see docs/deploy.md.
set -euo pipefail
cd "$(dirname "$0")/.."

files=(-f compose.yaml)
cold=0
purge=0
while (($#)); do
    case "$1" in
        --base-image) export IWAE_BASE_IMAGE="$2"; shift 2 ;;
        --torch-index) export IWAE_TORCH_INDEX_URL="$2"; shift 2 ;;
        -f) files+=(-f "$2"); shift 2 ;;
        --cold) cold=1; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
project=${SMOKE_PROJECT:-iwae-smoke}
port=${SMOKE_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
export IWAE_PUBLISH_PORT=$port
dc() { "${compose[@]}" -p "$project" "${files[@]}" "$@"; }
url=http://127.0.0.1:$port
digit=docker/mnist-test-0.png # MNIST test image 0, a 7
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
fail() { echo "smoke: FAIL: $*" >&2; dc logs --no-color --tail 40 >&2 || true; exit 1; }
buildlog=$(mktemp)

teardown() {
    local rc=$?
    if ((purge)); then dc down --volumes --rmi all --remove-orphans >/dev/null 2>&1 || true
    else dc down --remove-orphans >/dev/null 2>&1 || true; fi
    rm -f "$buildlog"
    echo "smoke: torn down (exit $rc)"
}
trap teardown EXIT

echo "smoke: ${compose[*]}, files ${files[*]}, project $project, port $port"
echo "smoke: base image ${IWAE_BASE_IMAGE:-python:3.12-slim (compose default)}," \
    "torch index ${IWAE_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu (compose default)}"
if ((cold)); then dc down --volumes --remove-orphans >/dev/null 2>&1 || true; fi

t=$(now)
dc build >"$buildlog" 2>&1 || { tail -30 "$buildlog" >&2; fail "build"; }
echo "smoke: build $(since "$t") s"

t=$(now)
dc up -d >/dev/null 2>&1 || fail "up"
cid=$(dc ps -q iwae)
[ -n "$cid" ] || fail "no container"
ready=""
while :; do
    [ -z "$ready" ] && curl -sf -o /dev/null "$url/readyz" && ready=$(since "$t")
    health=$(docker inspect -f '{{.State.Health.Status}} {{.State.Status}}' "$cid")
    case "$health" in
        "healthy running") break ;;
        *exited* | *dead* | *restarting* | "unhealthy "*) fail "container is $health" ;;
    esac
    python3 -c "import sys; sys.exit(float(sys.argv[1]) > 420)" "$(since "$t")" || fail "not healthy after 420 s"
    sleep 0.25
done
echo "smoke: up -> ready ${ready:-$(since "$t")} s, up -> healthy $(since "$t") s"
# CPU time (user + sys) of the container's processes so far, their reaped children included: less dependent on
# how busy the host is than the wall times above.
cpu=$(docker exec "$cid" python -c "import os
t = 0
for p in filter(str.isdigit, os.listdir('/proc')):
    try:
        t += sum(map(int, open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[11:15]))
    except OSError:
        pass
print(f'{t / os.sysconf(\"SC_CLK_TCK\"):.1f}')") || cpu="?"
echo "smoke: CPU time of the server up to healthy: $cpu s (host: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo ?))"
image=$(docker inspect -f '{{.Image}}' "$cid")
size=$(docker image inspect -f '{{.Size}}' "$image")
echo "smoke: image $(docker inspect -f '{{.Config.Image}}' "$cid") $(python3 -c "print(f'{$size / 1e9:.2f} GB')") ($size bytes)"

check() { # check NAME PYTHON_EXPRESSION_ON_r JSON
    python3 -c "import json, sys; r = json.loads(sys.argv[2]); assert $2, r; print('smoke: ' + sys.argv[1] + ' ok')" "$1" "$3" ||
        fail "$1"
}
check /readyz 'r["status"] == "ready" and len(r["models"]) >= 1' "$(curl -sf "$url/readyz")"
body=$(curl -sf -X POST "$url/loglik?k=64&seed=0&binarize=threshold" -F "files=@$digit") || fail "/loglik"
check "/loglik (k=64)" 'len(r["results"]) == 1 and -200 < r["results"][0]["loglik"] < -20 and r["seed"] == 0' "$body"
echo "smoke: L_64 of the digit: $(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["results"][0]["loglik"])' "$body") nats"
body=$(curl -sf "$url/sample?n=4&seed=1") || fail "/sample"
check "/sample (n=4)" 'len(r["probs"]) == 4 and all(0 <= p <= 1 for row in r["probs"] for p in row)' "$body"

t=$(now)
dc stop >/dev/null 2>&1 || fail "stop"
read -r code oom < <(docker inspect -f '{{.State.ExitCode}} {{.State.OOMKilled}}' "$cid")
echo "smoke: SIGTERM -> exited in $(since "$t") s with code $code (OOM killed: $oom)"
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
dc logs --no-color iwae 2>/dev/null | grep "Finished server process" >/dev/null || fail "no graceful uvicorn shutdown in the logs"
echo "smoke: PASS"
