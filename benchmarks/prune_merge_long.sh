#!/usr/bin/env bash
# Issue 4, a longer budget: Prune-and-Merge at 0.65 MACs (the paper's operating point) fine-tuned for
# 2 epochs (780 steps of 128) with the other settings of prune_merge_cifar10.sh (run that first: the
# scores, the dense row and the 200-step row come from it). About 15 minutes on 2 CPU cores.
# Result: benchmarks/results/prune_merge_long_cifar10.{md,json}.
. "$(dirname "$0")/short_finetune.sh"
OUT=${OUT:-$WORK/prune_merge_cifar10}
BASE=${BASE:-$WORK/sit_cifar10}
finetune_args --epochs 2  # same settings, 2 epochs instead of 200 steps
vitslim train "${COMMON[@]}" --method prune_merge --macs 0.65 --option scores="$OUT/scores.safetensors" \
    --kd-weight 0.5 --kd-mode convex --out "$OUT/prune_merge-2ep@0.65"
"$PYTHON" benchmarks/finetune_report.py "$OUT" "$(realpath --relative-to="$OUT" "$BASE/dense")" "prune_merge@0.65" \
    "prune_merge-2ep@0.65" --name prune_merge_long_cifar10 --results "$RESULTS"
