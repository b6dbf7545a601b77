#!/usr/bin/env bash
# Full-size vision-only training step on one GPU (see bench/gpu_train.py). No download needed.
# Prints samples/s, peak memory and MFU with and without activation checkpointing.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$PY bench/gpu_train.py --steps 10 --batch 16 --seq 400
$PY bench/gpu_train.py --steps 10 --batch 16 --seq 400 --no_checkpointing
