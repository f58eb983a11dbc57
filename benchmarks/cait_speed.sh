#!/usr/bin/env bash
# Issue 7: CAIT-style ATME + CDCP (vitslim reconstruction) on DeiT-S 224 (random init), CPU, 2 threads,
# fp32: dense vs ATME, CDCP-exported and CAIT-exported (joint) at 0.5 and 0.7 MACs; measured speed-up
# and measured/ideal at batch 32 and batch 1. About 10 minutes on a quiet 2-core machine.
# Results: benchmarks/results/deit_s_cait_speed_b{32,1}.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1
python benchmarks/cait_speed.py --batch-size 32 --runs 12 --threads 2 --name deit_s_cait_speed_b32
python benchmarks/cait_speed.py --batch-size 1 --runs 30 --threads 2 --name deit_s_cait_speed_b1
