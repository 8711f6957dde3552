#!/usr/bin/env bash
# Downloads, here (where PyPI is reachable), the wheels that bench/gpu_check.py installs on the GPU machine, whose
# image (Python 3.12, torch 2.11 CUDA, numpy, scipy, scikit-learn, pandas, pyarrow, matplotlib, tqdm, pyyaml,
# pillow, threadpoolctl) lacks only these. --no-deps: each needed dependency is named here. The folder is
# git-ignored and travels with the working tree (64 MiB in all; see docs/benchmarks.md "GPU check").
#
#   bash bench/gpu_wheels.sh            # -> .gpu-wheels/*.whl (versions of the project's .venv when present)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
# polars >= 1.34 is a thin package + its compiled runtime (polars-runtime-32); isal is optional (faster .nii.gz
# reads, preprocess falls back to gzip without it). Whatever else the check's path imports outside the image is an
# optional import of monai, pydicom or torch (jsonschema, pylibjpeg, dill: seen with python -X importtime).
PACKAGES=(polars polars-runtime-32 monai nibabel pydicom isal)
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
specs=()
for p in "${PACKAGES[@]}"; do
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null || true)
  specs+=("$p${v:+==$v}")
done
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
# at most 64 MiB of working tree travels: a wheel above 16 MiB (polars' runtime, 54 MB) is stored as <wheel>.xz,
# its contents re-zipped uncompressed and xz-compressed (31 MB; ~3 min here); gpu_check.py unpacks it there
for w in "$DEST"/*.whl; do
  if [ "$(stat -c %s "$w")" -gt $((16 * 1024 * 1024)) ]; then "$PY" bench/gpu_check.py --pack-wheel "$w"; fi
done
ls -l "$DEST"
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB ($total bytes) for ${specs[*]}"
[ "$total" -lt $((48 * 1024 * 1024)) ] || { echo "wheels exceed 48 MiB: too close to the 64 MiB that can travel" >&2; exit 1; }
