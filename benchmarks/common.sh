# Sourced by every benchmark script: run from the repository root with the venv, offline, and
# the variables the scripts share. `vitslim` is `$PYTHON -m vitslim` (PYTHON defaults to python).
#   WORK   where training runs go (vitslim-out)    RESULTS  where tables go ($VITSLIM_BENCH_RESULTS,
#          default benchmarks/results)
#   MODEL  the reference CIFAR-10 ViT in $VITSLIM_SHARED (default ../shared)    DATA  cifar10
# Smoke mode (VITSLIM_BENCH_SMOKE=1, see benchmarks/smoke.py) runs the same commands in seconds:
# WORK and RESULTS are $VITSLIM_BENCH_DIR (a new temporary folder when unset), MODEL a tiny random-init
# ViT, DATA digits when CIFAR-10 is not there, and the SMOKE_* arguments, appended to the commands
# (the last value wins), cut them to a step or two, a few images and one thread.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
export HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python}
vitslim() { "$PYTHON" -m vitslim "$@"; }
# The command an auto report records: `bash SCRIPT`, with TARGETS="..." naming every target folder in OUT (the
# report covers them all, met or not, from this run or an earlier one) unless they are DEFAULT.
targets_command() {  # SCRIPT OUT DEFAULT
  local reported
  reported=$(for d in "$2"/*=*/; do if [ -d "$d" ]; then basename "$d"; fi; done | tr '\n' ' ')
  reported=${reported% }
  if [ "$reported" = "$3" ]; then echo "bash $1"; else echo "TARGETS=\"$reported\" bash $1"; fi
}
SHARED=${VITSLIM_SHARED:-../shared}
MODEL=$SHARED/models/cifar10-vit-d12w128
DATA=cifar10
if [ -n "${VITSLIM_BENCH_SMOKE:-}" ] && [ "$VITSLIM_BENCH_SMOKE" != 0 ]; then
  export VITSLIM_BENCH_DIR=${VITSLIM_BENCH_DIR:-$(mktemp -d -t vitslim-bench-smoke-XXXXXX)}
  WORK=$VITSLIM_BENCH_DIR RESULTS=$VITSLIM_BENCH_DIR/results
  # one thread: two spinning OpenMP threads on a busy machine cost several times the work
  SMOKE_TRAIN=(--max-steps 2 --batch-size 8 --limit 16 --val-limit 16 --threads 1)
  SMOKE_CALIBRATE=(--iters 2 --batch-size 8 --limit 16 --threads 1)
  SMOKE_EVAL=(--limit 16 --threads 1)
  SMOKE_COMPARE=(--limit 16 --batch-size 2 --runs 5 --threads 1 --budgets 0.5)
  SMOKE_AUTO=(--holdout 16 --limit 16 --batch-size 2 --runs 3 --threads 1)
  MODEL=$WORK/tiny-vit
  if [ ! -f "$MODEL/config.json" ]; then "$PYTHON" benchmarks/smoke.py "$MODEL" >/dev/null; fi
  if [ ! -d "${VITSLIM_DATA:-$SHARED/data}/cifar10" ]; then DATA=digits; fi
  echo "smoke mode: $MODEL on $DATA, output in $WORK" >&2
else
  WORK=vitslim-out RESULTS=${VITSLIM_BENCH_RESULTS:-benchmarks/results} SMOKE_TRAIN=() SMOKE_CALIBRATE=() SMOKE_EVAL=() SMOKE_COMPARE=() SMOKE_AUTO=()
fi
