#!/usr/bin/env bash
# Install everything the tests need into ./.venv, then run the whole suite (CPU only, about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q "$@"
