#!/usr/bin/env bash
# Issue 17: the learning curve at a real fine-tuning budget. The reference CIFAR-10 ViT at MACS (0.5)
# fine-tuned for EPOCHS (5; 390 steps of 128 images each) with every method's recipe-style loss
# (the terms of short_finetune.sh's scripts: logit KD, SiT's FRD, SPViT's ratio and token terms) and
# the same seed, augmentation, lr schedule and budget for all; a dense run trained the same way is the
# control. Top-1 on all 10,000 test images before training and after every epoch. Each run
# checkpoints every 50 steps and the script resumes (--resume auto): rerun it after an interruption
# and it continues where it stopped; the report marks unfinished runs and keeps the rows an earlier
# report finished (a new checkout has no run folders: the runs are not trained again). About 40-70
# minutes a run on 2 CPU cores (ToMe about 40, the dense control about 70). RUNS (space-separated)
# picks and orders the runs. Long runs share the CPU with everything else: time no speed while one
# trains.
# Result: benchmarks/results/long_finetune_cifar10-${EPOCHS}ep@${MACS}.{md,json,png}.
. "$(dirname "$0")/common.sh"
EPOCHS=${EPOCHS:-5}
MACS=${MACS:-0.5}
ALL_RUNS="dense tome evit prune_merge sit spvit cait spvit_staged"
RUNS=${RUNS:-$ALL_RUNS}
DRIVER="bash benchmarks/long_finetune.sh"  # as the report quotes it, with the settings that differ from the defaults
if [ "$RUNS" != "$ALL_RUNS" ]; then DRIVER="RUNS=\"$RUNS\" $DRIVER"; fi
if [ "$MACS" != 0.5 ]; then DRIVER="MACS=$MACS $DRIVER"; fi
if [ "$EPOCHS" != 5 ]; then DRIVER="EPOCHS=$EPOCHS $DRIVER"; fi
NAME=long_finetune_cifar10-${EPOCHS}ep@$MACS
OUT=${OUT:-$WORK/$NAME}
COMMON=(--model "$MODEL" --data "$DATA" --epochs "$EPOCHS" --batch-size 128 --lr 2e-4 --warmup-epochs 0.05
        --min-lr 1e-6 --weight-decay 0.05 --label-smoothing 0.1 --teacher dense --precision bf16 --threads 2
        --seed 0 --eval-before --eval-every 1 --checkpoint-every 50 --resume auto --no-progress "${SMOKE_TRAIN[@]}")
KD=(--kd-weight 0.5 --kd-mode convex)  # logit distillation from the dense model (DeiT-style)
SPVIT=(--method spvit --macs "$MACS" --kd-weight 0.5 --kd-mode add --token-weight 0.5)  # + its ratio loss
mkdir -p "$OUT"
folder_of() { if [ "$1" = dense ]; then echo dense; else echo "$1@$MACS"; fi; }
folders=()
for run in $RUNS; do folders+=("$(folder_of "$run")"); done
# the runs still to train: finished neither in OUT nor in the committed report (whose run folders a new
# checkout or another machine does not have)
pending=" $("$PYTHON" benchmarks/long_report.py "$OUT" "${folders[@]}" --name "$NAME" --results "$RESULTS" --pending | tr '\n' ' ') "
for run in $RUNS; do
  folder=$(folder_of "$run")
  case $pending in *" $folder "*) ;; *) continue ;; esac
  case $run in
    dense) args=("${KD[@]}") ;;
    tome|evit|topk|atme|cdcp) args=(--method "$run" --macs "$MACS" "${KD[@]}") ;;
    cait) args=(--method cait --macs "$MACS" "${KD[@]}") ;;
    prune_merge)  # the paper's gradient-weighted scores from a calibration pass on training images
      if [ ! -f "$OUT/scores.safetensors" ]; then
        vitslim calibrate --model "$MODEL" --data "$DATA" --split train --iters 50 --batch-size 128 --seed 0 \
            --macs "$MACS" --out "$OUT/scores.safetensors" --no-progress "${SMOKE_CALIBRATE[@]}"
      fi
      args=(--method prune_merge --macs "$MACS" --option scores="$OUT/scores.safetensors" "${KD[@]}") ;;
    sit) args=(--method sit --macs "$MACS" --kd-weight 2 --kd-mode add --token-weight 2) ;;  # KD + FRD
    spvit) args=("${SPVIT[@]}") ;;
    spvit_staged)  # SPViT with its paper's staged rates (backbone frozen for the first epoch, then 1% of the lr;
                   # cls/pos frozen): why SPViT does not learn under the shared schedule
      args=("${SPVIT[@]}" --freeze-backbone-epochs 1 --backbone-lr-scale 0.01 --freeze-tokens true) ;;
    *) echo "long_finetune.sh: unknown run '$run'" >&2; exit 2 ;;
  esac
  vitslim train "${COMMON[@]}" "${args[@]}" --out "$OUT/$folder"
done
exported=()
for folder in "${folders[@]}"; do
  case $folder in cait@*|cdcp@*)
    if [ -f "$OUT/$folder/summary.json" ] && [ ! -f "$OUT/$folder/exported.json" ]; then exported+=("$folder"); fi ;;
  esac
done
if [ ${#exported[@]} -gt 0 ]; then
  "$PYTHON" benchmarks/cait_export_eval.py "$OUT" "${exported[@]}" --data "$DATA" "${SMOKE_EVAL[@]}"
fi
"$PYTHON" benchmarks/long_report.py "$OUT" "${folders[@]}" --name "$NAME" --results "$RESULTS" --driver "$DRIVER"
