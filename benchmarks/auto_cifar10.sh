#!/usr/bin/env bash
# Issue 16: `vitslim auto` on the reference CIFAR-10 ViT at 0.5 and 0.7 MACs and at a 1.5x batch-32
# speed-up, against the best single method chosen by hand from the committed training-free table
# (benchmarks/results/cifar10_training_free.json). Candidates ranked on 1024 held-out train-split
# images; the chosen model reported on the 10,000 test images. A target the search cannot meet here
# is reported as such. Result: benchmarks/results/auto_cifar10.{md,json}.
# FINETUNE=STEPS: the same searches with `--finetune-budget STEPS` (the best 3 fine-tuned with distillation
# and re-ranked), in their own folders: benchmarks/results/auto_cifar10_finetuneSTEPS.{md,json}, with a
# table of the finalists before and after. TARGETS (space-separated) picks the targets.
. "$(dirname "$0")/common.sh"
NAME=auto_cifar10
FINETUNE_ARGS=()
if [ -n "${FINETUNE:-}" ]; then
  NAME=auto_cifar10_finetune$FINETUNE
  FINETUNE_ARGS=(--finetune-budget "$FINETUNE")
fi
DEFAULT_TARGETS="macs=0.5 macs=0.7 speedup=1.5"
TARGETS=${TARGETS:-$DEFAULT_TARGETS}
OUT=${OUT:-$WORK/$NAME}
for target in $TARGETS; do
  vitslim auto --model "$MODEL" --data "$DATA" "--${target%%=*}" "${target#*=}" --holdout 1024 --batch-size 32 \
      --threads 2 --no-progress --out "$OUT/$target" "${FINETUNE_ARGS[@]}" "${SMOKE_AUTO[@]}" \
    || echo "auto_cifar10.sh: $target not met on this machine (see above)" >&2
done
COMMAND=$(targets_command benchmarks/auto_cifar10.sh "$OUT" "$DEFAULT_TARGETS")
if [ -n "${FINETUNE:-}" ]; then COMMAND="FINETUNE=$FINETUNE $COMMAND"; fi
"$PYTHON" benchmarks/auto_report.py "$OUT" --hand benchmarks/results/cifar10_training_free.json --name "$NAME" \
    --results "$RESULTS" --command "$COMMAND"
