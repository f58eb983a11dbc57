#!/usr/bin/env bash
# Foundation benchmarks (issue 2). Run from the repository root with the venv active:
#   bash benchmarks/foundation.sh            # all three
#   bash benchmarks/foundation.sh speed      # DeiT-S speed only
# Results land in benchmarks/results/ as markdown + JSON (each records the command that made it).
# Needs ../shared (or VITSLIM_DATA / a copy of the reference model) for the CIFAR-10 part.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v vitslim >/dev/null; then
  if [[ -f .venv/bin/activate ]]; then . .venv/bin/activate
  else echo "foundation.sh: vitslim is not installed: run the README's first command" >&2; exit 1; fi
fi
export HF_HUB_OFFLINE=1
out=benchmarks/results
what=${1:-all}
shared=${VITSLIM_SHARED:-../shared}

if [[ $what == all || $what == speed ]]; then
  # (a) DeiT-S 224, random init (speed does not depend on the weights), 2 threads, fp32
  vitslim bench --model deit_small_patch16_224 --budgets 0.5,0.6,0.7 --batch-size 32 --runs 12 \
    --threads 2 --out $out --name deit_s_speed_b32
  vitslim bench --model deit_small_patch16_224 --budgets 0.5,0.6,0.7 --batch-size 1 --runs 30 \
    --threads 2 --out $out --name deit_s_speed_b1
fi
if [[ $what == all || $what == allocator ]]; then
  # the same batch-32 run with glibc's stock allocator (a fresh process, nothing tuned)
  vitslim bench --model deit_small_patch16_224 --budgets 0.5,0.6,0.7 --batch-size 32 --runs 7 \
    --threads 2 --allocator default --out $out --name deit_s_speed_b32_stock_allocator
fi
if [[ $what == all || $what == accuracy ]]; then
  # (b) the reference CIFAR-10 ViT (66.4% dense), training-free, on all 10,000 test images
  vitslim compare --model $shared/models/cifar10-vit-d12w128 --data cifar10 --split test \
    --budgets 0.5,0.6,0.7 --batch-size 32 --runs 7 --threads 2 --out $out --name cifar10_training_free
fi
if [[ $what == all || $what == overhead ]]; then
  # where ToMe's time goes at batch 1, and the token-gather choice
  python benchmarks/tome_overhead.py
fi
