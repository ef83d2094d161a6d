#!/usr/bin/env bash
# Make ./.venv with vistrain installed (editable) plus the extras named in $1 (e.g. "tensorboard,test").
# torch==2.13.0 goes in first when the venv has no torch: on a machine without CUDA that is the CPU build,
# and installing it before vistrain keeps pip from resolving an unpinned torch with gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-tensorboard}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[${extras}]"
