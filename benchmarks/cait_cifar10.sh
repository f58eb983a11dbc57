#!/usr/bin/env bash
# Issue 7: CAIT-style ATME, CDCP and joint CAIT (vitslim reconstruction) on the reference CIFAR-10 ViT at
# 0.5 and 0.7 MACs, after the same 200-step fine-tune as the SiT/SPViT rows (CE + 0.5 convex KD, tau 1,
# dense teacher). The dense, ToMe and EViT rows with that budget are reused from SIT_OUT when present
# (benchmarks/sit_cifar10.sh), else trained here. The CDCP/CAIT runs are then exported (sliced) and the
# exported models evaluated (fp32): that is the accuracy reported. About 6 x 6 = 36 minutes on 2 CPU cores
# (plus 25 minutes if the ToMe/EViT/dense runs must be trained). Results: benchmarks/results/cait_cifar10.{md,json}.
. "$(dirname "$0")/short_finetune.sh"
OUT=${OUT:-$WORK/cait_cifar10}
SIT_OUT=${SIT_OUT:-$WORK/sit_cifar10}
mkdir -p "$OUT"
reuse() {  # reuse() RUN ARGS...: link SIT_OUT/RUN when it finished, else train it here
  local run=$1; shift
  if [ -f "$SIT_OUT/$run/summary.json" ] && [ "$(realpath "$SIT_OUT")" != "$(realpath "$OUT")" ]; then
    ln -sfn "$(realpath "$SIT_OUT/$run")" "$OUT/$run"
  elif [ ! -f "$OUT/$run/summary.json" ]; then
    vitslim train "${COMMON[@]}" "$@" --kd-weight 0.5 --kd-mode convex --out "$OUT/$run"
  fi
}
reuse dense
runs=(dense) exported=()
for macs in 0.5 0.7; do
  for method in tome evit; do
    reuse "$method@$macs" --method $method --macs $macs
  done
  for method in atme cdcp cait; do
    vitslim train "${COMMON[@]}" --method $method --macs $macs --kd-weight 0.5 --kd-mode convex \
        --out "$OUT/$method@$macs"
  done
  runs+=("tome@$macs" "evit@$macs" "atme@$macs" "cdcp@$macs" "cait@$macs")
  exported+=("cdcp@$macs" "cait@$macs")
done
"$PYTHON" benchmarks/cait_export_eval.py "$OUT" "${exported[@]}" --data "$DATA" "${SMOKE_EVAL[@]}"
"$PYTHON" benchmarks/finetune_report.py "$OUT" "${runs[@]}" --name cait_cifar10 --results "$RESULTS"
