#!/usr/bin/env bash
# Issue 5, a longer budget: SiT + FRD at 0.5 MACs fine-tuned for 2 epochs (780 steps of 128) with
# the other settings of sit_cifar10.sh (run that first: the dense and 200-step rows come from it),
# to see how much of SiT's gap there is the short budget. About 18 minutes on 2 CPU cores.
# Result: benchmarks/results/sit_long_cifar10.{md,json}.
. "$(dirname "$0")/short_finetune.sh"
OUT=${OUT:-$WORK/sit_cifar10}
finetune_args --epochs 2  # same settings, 2 epochs instead of 200 steps
vitslim train "${COMMON[@]}" --method sit --macs 0.5 --kd-weight 2 --kd-mode add --token-weight 2 \
    --out "$OUT/sit-frd-2ep@0.5"
"$PYTHON" benchmarks/finetune_report.py "$OUT" dense "sit-frd@0.5" "sit-frd-2ep@0.5" --name sit_long_cifar10 \
    --results "$RESULTS"
