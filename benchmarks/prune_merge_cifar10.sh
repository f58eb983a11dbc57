#!/usr/bin/env bash
# Issue 4 benchmark: Prune-and-Merge on the reference CIFAR-10 ViT at 0.5, 0.65 and 0.7 MACs.
# 1. Scoring pass (gradient-weighted attention) on 50 batches of 128 CIFAR-10 training images
#    (eval transform, seed 0) -> one scores file; the plan for each budget comes from it.
# 2. Training-free top-1 (--eval-before: after calibration only) and after the 200-step fine-tune
#    of short_finetune.sh with CE + 0.5 KD (tau 1, convex) from the dense model, exactly as the
#    ToMe / EViT rows of benchmarks/sit_cifar10.sh, which are reused from $WORK/sit_cifar10
#    (run that script first if they are missing). We do not use the published loss (additive KD,
#    tau 20, per logit element): with 10 classes its effective weight is tau^2/10 = 40x CE.
# About 20 minutes on 2 CPU cores. Results: benchmarks/results/prune_merge_cifar10.{md,json}.
. "$(dirname "$0")/short_finetune.sh"
OUT=${OUT:-$WORK/prune_merge_cifar10}
BASE=${BASE:-$WORK/sit_cifar10}
SCORES=$OUT/scores.safetensors
vitslim calibrate --model "$MODEL" --data "$DATA" --split train --iters 50 --batch-size 128 --seed 0 \
    --macs 0.5 --out "$SCORES" --no-progress "${SMOKE_CALIBRATE[@]}"
runs=("$(realpath --relative-to="$OUT" "$BASE/dense")")
for macs in 0.5 0.65 0.7; do
  vitslim train "${COMMON[@]}" --method prune_merge --macs $macs --option scores="$SCORES" \
      --kd-weight 0.5 --kd-mode convex --out "$OUT/prune_merge@$macs"
  runs+=("prune_merge@$macs")
  if [ "$macs" != 0.65 ]; then
    runs+=("$(realpath --relative-to="$OUT" "$BASE/tome@$macs")" "$(realpath --relative-to="$OUT" "$BASE/evit@$macs")")
  fi
done
"$PYTHON" benchmarks/finetune_report.py "$OUT" "${runs[@]}" --name prune_merge_cifar10 --results "$RESULTS"
