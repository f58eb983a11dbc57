#!/usr/bin/env bash
# Issue 3 benchmark: the reference CIFAR-10 ViT compressed with EViT and ToMe at 0.6 MACs, then
# fine-tuned for the same budget (1 epoch = 390 steps of 128 images) with logit distillation from
# the dense model; a dense run with the same budget is the control (the reference model is
# under-trained, so fine-tuning alone moves it too). Top-1 on all 10,000 test images before and
# after. About 35 minutes on 2 CPU cores. Results: benchmarks/results/finetune_cifar10.{md,json}.
. "$(dirname "$0")/common.sh"
OUT=${OUT:-$WORK/finetune_cifar10}
COMMON=(--model "$MODEL" --data "$DATA" --epochs 1 --batch-size 128 --lr 2e-4 --warmup-epochs 0.05
        --min-lr 1e-6 --weight-decay 0.05 --label-smoothing 0.1 --kd-weight 0.5 --kd-mode convex
        --kd-tau 1 --teacher dense --precision bf16 --threads 2 --seed 0 --eval-before --no-progress
        "${SMOKE_TRAIN[@]}")
vitslim train "${COMMON[@]}" --out "$OUT/dense"
for method in evit tome; do
  vitslim train "${COMMON[@]}" --method "$method" --macs 0.6 --out "$OUT/$method"
done
"$PYTHON" benchmarks/finetune_report.py "$OUT" dense evit tome --name finetune_cifar10 --results "$RESULTS"
