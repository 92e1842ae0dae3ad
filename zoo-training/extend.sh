#!/bin/bash
# Continue a finished zoo model at a constant learning rate (issue 10): the paper's schedule ends with 2187
# epochs at 1e-4; our 300-epoch constant-decay runs reach 1e-4 only at their last epoch, still improving.
# Starts from models/zoo/NAME (weights only: a fresh Adam state, seed 2 so the batch order and binarization
# noise do not replay the first run's) and writes zoo-training/NAME, resumable like run.sh.
# usage: zoo-training/extend.sh NAME OBJECTIVE K LAYERS EPOCHS [LR] [ESTIMATOR] [DATASET]
set -euo pipefail
name=$1 objective=$2 k=$3 layers=$4 epochs=$5 lr=${6:-1e-4} estimator=${7:-$2} dataset=${8:-mnist}
here="$(cd "$(dirname "$0")" && pwd)"
repo="${IWAE_REPO:-$(dirname "$here")}"
cd "$repo"
export OMP_NUM_THREADS=1
# Resume once a state exists (a kill before the first state write starts again from the zoo model).
if [[ -f "$here/$name.state.safetensors" ]]; then start=(--resume); else start=(--init-from "models/zoo/$name.safetensors"); fi
exec nice -n 10 "${IWAE_PYTHON:-.venv/bin/python}" -m "${IWAE_CLI_MODULE:-iwae_cli}" train --dataset "$dataset" \
  --objective "$objective" --estimator "$estimator" --k "$k" --layers "$layers" --epochs "$epochs" \
  --schedule constant --lr "$lr" --seed 2 --threads 1 --checkpoint-minutes 10 "${start[@]}" \
  --out "$here/$name.safetensors"
