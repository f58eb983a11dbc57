#!/usr/bin/env bash
# Issue 6 benchmark: SPViT on the reference CIFAR-10 ViT at 0.5 and 0.7 MACs, fine-tuned with the
# same budget and settings as benchmarks/sit_cifar10.sh (200 steps of 128 images, AdamW lr 2e-4 for
# every parameter, bf16) with SPViT's losses: CE + 0.5 KL (tau 1) + 0.5 token MSE over the tokens kept
# at the last stage + the ratio loss (2/3 per stage). Inference prunes for real (deterministic top-k).
# The dense, ToMe and EViT rows are the runs of sit_cifar10.sh (same OUT folder): run that first.
# About 12 minutes on 2 CPU cores. Results: benchmarks/results/spvit_cifar10.{md,json}.
# Then: python benchmarks/spvit_modes.py "$OUT/spvit@0.5/last.pt" --limit 2000 (three forwards, README).
. "$(dirname "$0")/short_finetune.sh"
OUT=${OUT:-$WORK/sit_cifar10}
runs=(dense)
for macs in 0.5 0.7; do
  vitslim train "${COMMON[@]}" --method spvit --macs $macs --kd-weight 0.5 --kd-mode add --token-weight 0.5 \
      --out "$OUT/spvit@$macs"
  runs+=("spvit@$macs" "tome@$macs" "evit@$macs")
done
"$PYTHON" benchmarks/finetune_report.py "$OUT" "${runs[@]}" --name spvit_cifar10 --results "$RESULTS"
