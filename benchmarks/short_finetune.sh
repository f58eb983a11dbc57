# Shared by sit_cifar10.sh and spvit_cifar10.sh (sourced): the 200-step fine-tune both use, so
# their rows compare at the same budget. Sets OUT and COMMON (vitslim train arguments).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
export HF_HUB_OFFLINE=1
MODEL=../shared/models/cifar10-vit-d12w128
OUT=${OUT:-vitslim-out/sit_cifar10}
COMMON=(--model "$MODEL" --data cifar10 --max-steps 200 --batch-size 128 --lr 2e-4 --warmup-epochs 0.05
        --min-lr 1e-6 --weight-decay 0.05 --label-smoothing 0.1 --teacher dense --precision bf16
        --threads 2 --seed 0 --eval-before --no-progress)
