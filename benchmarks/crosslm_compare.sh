#!/usr/bin/env bash
# Issue 4's comparison: CrossLM (with and without the KL term) vs local, fedavg and FDKT on drug-reviews and tweets,
# 4 silos with mixed SLMs (MiniLM-L6 / MiniLM-L3 alternating), seeds 0-2, Flower's simulation engine (each silo
# actor is its own process, so its torch RNG is its own). Runs in priority order; a rerun skips what is done.
# fedavg cannot average mixed architectures: it runs with MiniLM-L6 in every silo.
#   bash benchmarks/crosslm_compare.sh [OUT]      (default benchmarks/results/crosslm-compare)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/crosslm-compare}
MIXED="--set slm.model=embedded,minilm-l3"
FDKT="--set fdkt.num-per-label=1 --set fdkt.max-tokens=32 --set fdkt.groups=2 --set fdkt.pooled=true --set fdkt.augment-per-label=8"
run() {  # run TASK ARGS...: one fedbridge compare over seeds 0-2 into OUT/TASK
  local task=$1; shift
  local extra=(); [ "$task" = tweets ] && extra=(--set partition.kind=dirichlet --set task.max-examples=1000)
  .venv/bin/fedbridge compare --seeds 0,1,2 --engine simulation --task "$task" "${extra[@]}" "$@" --out "$OUT/$task"
}
for task in drug-reviews tweets; do
  run "$task" --methods local,crosslm --sweep crosslm.kl-weight=1 $MIXED
  run "$task" --methods fedavg
done
run drug-reviews --methods crosslm --sweep crosslm.kl-weight=0 $MIXED
run drug-reviews --methods fdkt $FDKT $MIXED
run tweets --methods crosslm --sweep crosslm.kl-weight=0 $MIXED
run tweets --methods fdkt $FDKT $MIXED
# A setting where the LLM moves: 4x the LoRA steps at 10x the learning rate (32 steps at 5e-3), with and without
# the KL leash, seed 0 (its own directory: the run names would collide with the default-setting runs above).
.venv/bin/fedbridge compare --seeds 0 --engine simulation --task drug-reviews --methods crosslm \
  --sweep crosslm.kl-weight=0,1 $MIXED --set crosslm.lora-steps=8 --set crosslm.lora-lr=5e-3 \
  --out "$(dirname "$OUT")/crosslm-kl"
