#!/usr/bin/env bash
# Foundation benchmarks (issue 2). Run from anywhere with the venv active:
#   bash benchmarks/foundation.sh            # all four
#   bash benchmarks/foundation.sh accuracy   # one of: speed allocator accuracy overhead
# Results land in benchmarks/results/ as markdown + JSON (each records the command that made it).
# Needs ../shared (or VITSLIM_SHARED / VITSLIM_DATA) for the CIFAR-10 part.
. "$(dirname "$0")/common.sh"
what=${1:-all}
if [[ $what == all || $what == speed ]]; then
  # (a) DeiT-S 224 speed, ToMe / EViT / top-k (random init), 2 threads, fp32: results/deit_s_speed_b{32,1}
  bash benchmarks/speed.sh tome
fi
if [[ $what == all || $what == allocator ]]; then
  # the same batch-32 run with glibc's stock allocator (a fresh process, nothing tuned)
  bash benchmarks/speed.sh allocator
fi
if [[ $what == all || $what == accuracy ]]; then
  # (b) the reference CIFAR-10 ViT (66.4% dense), training-free, on all 10,000 test images
  vitslim compare --model "$MODEL" --data "$DATA" --split test --budgets 0.5,0.6,0.7 --batch-size 32 --runs 7 \
    --threads 2 --out "$RESULTS" --name cifar10_training_free "${SMOKE_COMPARE[@]}"
fi
if [[ $what == all || $what == overhead ]]; then
  # where ToMe's time goes at batch 1, and the token-gather choice
  "$PYTHON" benchmarks/tome_overhead.py
fi
