#!/usr/bin/env bash
# The GPU suite: every side-by-side benchmark at its GPU shapes in one command, one table (card, torch, date), JSON.
#
#   bash benchmarks/gpu_suite.sh [--out FILE.json]              # one GPU: under 10 minutes
#   bash benchmarks/gpu_suite.sh --cpu-smoke [--out FILE.json]  # the same pipeline on a CPU at tiny shapes, vistrain's
#                                                               # halves only (tests/test_gpu_suite.py runs it)
#
# Steps, most wanted first, each under `timeout` with a budget in seconds (the default below, or the environment's
# SUITE_BUDGET_<STEP>, e.g. SUITE_BUDGET_VAR_D16=200) and never past the suite's deadline (SUITE_DEADLINE_S, 540:
# the lent machines run a command for 600 s at most):
#   var_d16   140  vs_var.py --depth 16 --rounds 2   VAR-d16, 256 px, bf16, batch 32: training step, teacher forcing
#                                                    and class-conditional sampling (cfg 1.5, top-k 900, top-p 0.96)
#   vlm_222m  100  vs_nanovlm.py --shape 222m        nanoVLM-222M packed training step, greedy generation
#   vlm_460m  100  vs_nanovlm.py --shape 460m        nanoVLM-460M (its MFU)
#   var_d20    80  vs_var.py --depth 20 --rounds 2
#   gan       110  gan_step.py                       ResNet GAN at 128 and 256 px: eager, channels_last, compile, both
# The originals are checkouts the user fetched (nothing of them is in this repository): $VAR_REF (default VAR/ beside
# the repository, FoundationVision/VAR) and $NANOVLM_REF (default nanoVLM/ beside it); where one is missing, that
# benchmark runs vistrain's half alone and the table has no ratio for it. Each script writes its --json, which
# benchmarks/suite_table.py reads into the table; a step that times out or fails is named in its list of steps (the end
# of its log in the JSON). The JSON goes to --out, by default benchmarks/results/gpu_suite_<date>.json.
#
# The lent GPU machine (Python 3.12, torch 2.11 + CUDA, torchvision, transformers, scikit-learn; no omegaconf, no
# datasets, no network). Prepare it from here, where PyPI is reachable:
#   bash benchmarks/gpu_wheels.sh                  # .whl/ (git-ignored): omegaconf, datasets, dill, multiprocess
#   git clone https://github.com/FoundationVision/VAR .refs/VAR       # (echo /.refs/ >> .git/info/exclude)
#   git clone https://github.com/huggingface/nanoVLM .refs/nanoVLM
# then one call there, carrying .whl and .refs:
#   VAR_REF=.refs/VAR NANOVLM_REF=.refs/nanoVLM bash benchmarks/gpu_suite.sh --out $OUT/gpu_suite.json
# Nothing needs installing by hand: where omegaconf or datasets cannot be imported, the suite installs .whl/*.whl
# (pip --no-index --no-deps) into a temporary folder on PYTHONPATH, and src/ goes on PYTHONPATH too (the same as
# `pip install --no-deps --target DIR .whl/*.whl` and `pip install --no-deps -e .`).
set -uo pipefail

smoke=0
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) smoke=1 ;;
    --out) out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    *) echo "gpu_suite.sh: unknown argument $1 (expected --cpu-smoke, --out FILE.json)" >&2; exit 2 ;;
  esac
  shift
done
[ "${SUITE_CPU_SMOKE:-0}" = 1 ] && smoke=1
# paths given are the caller's; the defaults are the repository's and beside it
[ -n "$out" ] && out=$(realpath -m "$out")
var_ref=$(realpath -m "${VAR_REF:-$(dirname "$0")/../../VAR}")
nanovlm_ref=$(realpath -m "${NANOVLM_REF:-$(dirname "$0")/../../nanoVLM}")
cd "$(dirname "$0")/.."
repo=$PWD
if [ -z "$out" ]; then
  out=$repo/benchmarks/results/gpu_suite_$([ $smoke = 1 ] && echo cpu_smoke_)$(date +%Y-%m-%d).json
fi

PY=${PYTHON:-python3}
if [ $smoke = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_suite.sh: $PY sees no CUDA device; on a machine without one, run the smoke: --cpu-smoke" >&2
  exit 2
fi
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
results=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")
trap 'rm -rf "$results"' EXIT

if ! "$PY" -c "import omegaconf, datasets" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_suite.sh: omegaconf or datasets is missing and .whl/ has no wheels: run bash benchmarks/gpu_wheels.sh" \
         "where PyPI is reachable and carry .whl here" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$results/site" .whl/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$results/site"
fi

ref_of() {  # --ref PATH when PATH is a checkout, else nothing (vistrain's half alone)
  if [ $smoke = 0 ] && [ -d "$1" ]; then echo "--ref $1"; fi
}

deadline=${SUITE_DEADLINE_S:-540}  # counted from the start of this script ($SECONDS), wheels included
min_step_s=30  # a step with less time than this left is not started

# budget NAME DEFAULT: a step's seconds: SUITE_BUDGET_<NAME> or DEFAULT, no more than the suite has left
budget() {
  local var="SUITE_BUDGET_${1^^}" left=$((deadline - SECONDS))
  local seconds=${!var:-$2}
  echo $((seconds < left ? seconds : left))
}

# step NAME BUDGET SCRIPT ARGS...: benchmarks/SCRIPT ARGS --json, stopped after BUDGET seconds; notes the outcome
step() {
  local name=$1 seconds=$2 script=$3
  shift 3
  if [ "$seconds" -lt "$min_step_s" ]; then
    echo "== $name: not run, ${seconds} s left of the suite's ${deadline} s"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$script" -1 0 "$seconds" >>"$results/steps.tsv"
    return
  fi
  echo "== $name: $script $* (budget ${seconds} s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$seconds" "$PY" "benchmarks/$script" "$@" --json "$results/$name.json" 2>&1 \
    | tee "$results/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$script" "$rc" $((SECONDS - t0)) "$seconds" >>"$results/steps.tsv"
}

if [ $smoke = 1 ]; then
  step var_d1 "$(budget var_d1 120)" vs_var.py --depth 1 --resolution 64 --batch 2 --vae-ch 32 --sample-batch 1 \
    --steps 1 --rounds 1 --calls 1 --warmup 0 --threads 1
  step vlm_tiny "$(budget vlm_tiny 120)" vs_nanovlm.py --shape tiny --rounds 1 --steps 1 --gen-compile eager --threads 1
  seconds=$(budget gan 120)
  step gan "$seconds" gan_step.py --shape tiny --threads 1 --time-budget $((seconds / 2))
else
  # ref_of prints two words or none, hence unquoted
  # shellcheck disable=SC2046
  step var_d16 "$(budget var_d16 140)" vs_var.py --depth 16 --rounds 2 $(ref_of "$var_ref")
  # shellcheck disable=SC2046
  step vlm_222m "$(budget vlm_222m 100)" vs_nanovlm.py --shape 222m $(ref_of "$nanovlm_ref")
  # shellcheck disable=SC2046
  step vlm_460m "$(budget vlm_460m 100)" vs_nanovlm.py --shape 460m $(ref_of "$nanovlm_ref")
  # shellcheck disable=SC2046
  step var_d20 "$(budget var_d20 80)" vs_var.py --depth 20 --rounds 2 $(ref_of "$var_ref")
  # gan_step.py starts no case past its own budget, and keeps what it measured if stopped anyway
  seconds=$(budget gan 110)
  step gan "$seconds" gan_step.py --time-budget $((seconds * 2 / 3))
fi

"$PY" benchmarks/suite_table.py "$results" --out "$out" --seconds $SECONDS \
  $([ $smoke = 1 ] && echo --cpu-smoke)
