# Shared by the fine-tuning scripts (sourced): the 200-step fine-tune they use, so their rows compare at
# the same budget. Sets COMMON (vitslim train arguments) and finetune_args, which sets COMMON for
# another step budget (e.g. finetune_args --epochs 2).
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
finetune_args() {
  COMMON=(--model "$MODEL" --data "$DATA" "$@" --batch-size 128 --lr 2e-4 --warmup-epochs 0.05
          --min-lr 1e-6 --weight-decay 0.05 --label-smoothing 0.1 --teacher dense --precision bf16
          --threads 2 --seed 0 --eval-before --no-progress "${SMOKE_TRAIN[@]}")
}
finetune_args --max-steps 200
