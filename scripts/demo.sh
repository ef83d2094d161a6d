#!/usr/bin/env bash
# The embedded default: a class-conditional GAN on scikit-learn's digits, a few minutes on 2 CPU cores.
# Extra arguments are config overrides, e.g. scripts/demo.sh train.max_steps=300
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh tensorboard,hf
.venv/bin/vistrain train configs/gan/digits.yaml "$@"
