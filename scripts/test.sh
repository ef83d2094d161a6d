#!/usr/bin/env bash
# Install everything the tests need into ./.venv, then run the whole suite (CPU only: about 11 minutes;
# `scripts/test.sh -m "not slow"` about 1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The lmms-eval adapter's tests need lmms-eval's base classes only: its full install pulls torchvision, which does
# not work with the CPU build of torch, so it goes in without its dependencies (plus the few its API modules import).
if ! .venv/bin/python -c "import lmms_eval.api.model" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q --no-deps "lmms-eval>=0.7.3"
  .venv/bin/python -m pip install -q pyyaml pytz loguru
fi
# The report's browser test renders a page in headless Chromium (Debian's package): installed here when missing and
# apt-get can do it (as root, as on CI); elsewhere that test says it skips (CI=1 makes it fail instead).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
.venv/bin/python -m pytest -q "$@"
