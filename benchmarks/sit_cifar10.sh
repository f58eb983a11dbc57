#!/usr/bin/env bash
# Issue 5 benchmark: SiT on the reference CIFAR-10 ViT at 0.5 and 0.7 MACs, fine-tuned for 200
# steps of 128 images (about half an epoch) from the dense weights, with FRD (token 2 + logits 2,
# tau 1; reverse modules at 5x lr) and, as the paper's ablation, with CE + the same logit KD but no
# FRD (no reverse modules); beside ToMe and EViT with the same budget (CE + 0.5 KD). The dense model
# is the teacher everywhere, and a dense run with the same budget is the control. About 45 minutes on 2 CPU cores.
# Results: benchmarks/results/sit_cifar10.{md,json}.
. "$(dirname "$0")/short_finetune.sh"
OUT=${OUT:-$WORK/sit_cifar10}
vitslim train "${COMMON[@]}" --kd-weight 0.5 --kd-mode convex --out "$OUT/dense"
runs=(dense)
for macs in 0.5 0.7; do
  vitslim train "${COMMON[@]}" --method sit --macs $macs --kd-weight 2 --kd-mode add --token-weight 2 \
      --out "$OUT/sit-frd@$macs"
  vitslim train "${COMMON[@]}" --method sit --macs $macs --option reverse=False --kd-weight 2 --kd-mode add \
      --out "$OUT/sit-kd@$macs"
  for method in tome evit; do
    vitslim train "${COMMON[@]}" --method $method --macs $macs --kd-weight 0.5 --kd-mode convex \
        --out "$OUT/$method@$macs"
  done
  runs+=("sit-frd@$macs" "sit-kd@$macs" "tome@$macs" "evit@$macs")
done
"$PYTHON" benchmarks/finetune_report.py "$OUT" "${runs[@]}" --name sit_cifar10 --results "$RESULTS"
