#!/usr/bin/env bash
# Issue 4: Prune-and-Merge on DeiT-S 224 (random init; speed does not depend on the weights, the
# plan comes from the data-free scoring pass), CPU, 2 threads, fp32: measured vs ideal speed-up
# at batch 32 and 1. The ideal is the dense blocks on the same token counts, so measured/ideal
# also shows the cost of the merge and reconstruct matmuls (2 m N C per block, counted in MACs).
# Run on a quiet machine. Results: benchmarks/results/deit_s_prune_merge_speed_b{32,1}.{md,json}.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1
out=benchmarks/results
vitslim bench --model deit_small_patch16_224 --methods prune_merge --budgets 0.5,0.65,0.7 \
  --batch-size 32 --runs 12 --threads 2 --out $out --name deit_s_prune_merge_speed_b32 --no-plot
vitslim bench --model deit_small_patch16_224 --methods prune_merge --budgets 0.5,0.65,0.7 \
  --batch-size 1 --runs 30 --threads 2 --out $out --name deit_s_prune_merge_speed_b1 --no-plot
