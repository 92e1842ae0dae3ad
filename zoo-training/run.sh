#!/bin/bash
# Long zoo runs (issue 10): the constant-decay schedule chosen by the ablation in docs/results.md, 300 epochs,
# one thread each, resumable: rerun this script (it passes --resume) to continue where a run stopped.
# usage: zoo-training/run.sh NAME OBJECTIVE K LAYERS [ESTIMATOR] [DATASET]
set -euo pipefail
name=$1 objective=$2 k=$3 layers=$4 estimator=${5:-$2} dataset=${6:-mnist}
here="$(cd "$(dirname "$0")" && pwd)"
repo="${IWAE_REPO:-$(dirname "$here")}"
cd "$repo"
export OMP_NUM_THREADS=1
exec nice -n 10 "${IWAE_PYTHON:-.venv/bin/python}" -m "${IWAE_CLI_MODULE:-iwae_cli}" train --dataset "$dataset" \
  --objective "$objective" --estimator "$estimator" --k "$k" --layers "$layers" --epochs 300 \
  --schedule constant-decay --seed 1 --threads 1 --checkpoint-minutes 10 --resume \
  --out "$here/$name.safetensors"
