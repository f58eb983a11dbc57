#!/usr/bin/env bash
# Every DeiT-S 224 (and EVA-02-S 224) speed table in benchmarks/results, through one driver (benchmarks/speed.py):
# random init (speed does not depend on the weights), CPU, 2 threads, fp32, each model timed beside
# its ideal (its own blocks on the same token counts, no reduction work); batch 32 (12 timed runs)
# and batch 1 (30 runs). Run on a quiet machine (load average well below 1).
#   bash benchmarks/speed.sh              # all tables, about an hour on 2 cores
#   bash benchmarks/speed.sh sit cait     # some of them
# tables (results/NAME.{md,json}):
#   tome         ToMe, EViT, top-k at 0.5/0.6/0.7 (issue 2)              deit_s_speed_b{32,1}
#   allocator    the same at batch 32, glibc's stock allocator, 7 runs    deit_s_speed_b32_stock_allocator
#   sit          SiT inference model (no reverse modules), 0.5/0.7 (5)   deit_s_sit_speed_b{32,1}
#   spvit        SPViT with real pruning, 0.5/0.6/0.7 (issue 6)          deit_s_spvit_speed_b{32,1}
#   prune_merge  Prune-and-Merge, data-free plan, 0.5/0.65/0.7 (4);      deit_s_prune_merge_speed_b{32,1}
#                measured/ideal includes its merge and reconstruct matmuls (2 m N C per block, in MACs)
#   cait         ATME patched; CDCP and CAIT exported (sliced), 0.5/0.7  deit_s_cait_speed_b{32,1}
#   eva          EVA-02-S 224 (rotary positions, SwiGLU): the token      eva02_s_speed_b{32,1}
#                methods that run on the eva family, 0.5/0.7 (issue 15)
#   eva_spvit    SPViT on EVA-02-S (joined the eva family later)        eva02_s_spvit_speed_b{32,1}
#   pit          PiT-S 224 (pooling stages): SPViT (the paper's case),  pit_s_speed_b{32,1}
#                ToMe, EViT, top-k, ATME, 0.5/0.7; grid restored before each pooling (issue 15)
. "$(dirname "$0")/common.sh"
speed() { "$PYTHON" benchmarks/speed.py --model "${SPEED_MODEL:-deit_small_patch16_224}" --threads 2 --out "$RESULTS" "$@"; }
B32_B1=(--batch-sizes 32,1 --runs 12,30)
tables=("$@")
if [ ${#tables[@]} = 0 ] || [ "${tables[0]}" = all ]; then tables=(tome allocator sit spvit prune_merge cait eva eva_spvit pit); fi
for table in "${tables[@]}"; do
  case $table in
    tome) speed --methods tome,evit,topk --budgets 0.5,0.6,0.7 "${B32_B1[@]}" --name deit_s_speed ;;
    allocator) speed --methods tome,evit,topk --budgets 0.5,0.6,0.7 --batch-sizes 32 --runs 7 --allocator default \
                 --name deit_s_speed_b32_stock_allocator ;;
    sit) speed --methods sit --option sit.reverse=False --budgets 0.5,0.7 "${B32_B1[@]}" --name deit_s_sit_speed ;;
    spvit) speed --methods spvit --budgets 0.5,0.6,0.7 "${B32_B1[@]}" --name deit_s_spvit_speed ;;
    prune_merge) speed --methods prune_merge --budgets 0.5,0.65,0.7 "${B32_B1[@]}" --name deit_s_prune_merge_speed ;;
    cait) speed --methods atme,cdcp,cait --exported --budgets 0.5,0.7 "${B32_B1[@]}" --name deit_s_cait_speed ;;
    eva) SPEED_MODEL=eva02_small_patch14_224 speed --methods tome,evit,topk,atme --budgets 0.5,0.7 "${B32_B1[@]}" \
           --name eva02_s_speed ;;
    eva_spvit) SPEED_MODEL=eva02_small_patch14_224 speed --methods spvit --budgets 0.5,0.7 "${B32_B1[@]}" \
                 --name eva02_s_spvit_speed ;;
    pit) SPEED_MODEL=pit_s_224 speed --methods spvit,tome,evit,topk,atme --budgets 0.5,0.7 "${B32_B1[@]}" --name pit_s_speed ;;
    *) echo "speed.sh: unknown table '$table'; known: all tome allocator sit spvit prune_merge cait eva eva_spvit pit" >&2
       exit 2 ;;
  esac
done
