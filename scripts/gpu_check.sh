#!/usr/bin/env bash
# Device check of the Triton kernels and the GPU decode path, for one GPU, in under 8 minutes: kernel parity,
# greedy equality, decode tok/s against eager torch, achieved memory bandwidth; prints one JSON object.
# Runs from a plain checkout with the machine's own Python, torch and triton (installs nothing):
#   scripts/gpu_check.sh [--device cuda|hip] [--out FILE] [--parts parity,greedy,speed,bandwidth] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
