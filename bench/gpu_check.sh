#!/usr/bin/env bash
# On the GPU machine, .gpu-wheels carried (bench/gpu_wheels.sh made it here): the prepared check -> $OUT/gpu_check.{md,json,log}
cd "$(dirname "$0")/.." && set -o pipefail && mkdir -p "${OUT:=gpu_check_out}" && PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "${PYTHON:-python3}" bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
