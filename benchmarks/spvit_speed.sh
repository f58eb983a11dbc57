#!/usr/bin/env bash
# Issue 6: SPViT on DeiT-S 224 (random init; speed does not depend on the weights), CPU, 2 threads,
# fp32, inference with real pruning: measured vs ideal speed-up at batch 32 and batch 1.
# Run on a quiet machine. Results: benchmarks/results/deit_s_spvit_speed_b{32,1}.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results
vitslim bench --model deit_small_patch16_224 --methods spvit --budgets 0.5,0.6,0.7 \
  --batch-size 32 --runs 12 --threads 2 --out $out --name deit_s_spvit_speed_b32 --no-plot
vitslim bench --model deit_small_patch16_224 --methods spvit --budgets 0.5,0.6,0.7 \
  --batch-size 1 --runs 30 --threads 2 --out $out --name deit_s_spvit_speed_b1 --no-plot
