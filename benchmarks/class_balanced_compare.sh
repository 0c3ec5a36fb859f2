#!/usr/bin/env bash
# Does a label-balanced SLM loss (slm.class-balanced=true) move small silos off the majority label? `local` with and
# without it on drug-reviews and tweets, in the setting of crosslm_compare.sh (4 silos, MiniLM-L6 / MiniLM-L3
# alternating, seeds 0-2, simulation engine); the unbalanced runs are that grid's `local` records.
#   bash benchmarks/class_balanced_compare.sh [OUT]      (default benchmarks/results/class-balanced)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/class-balanced}
for task in drug-reviews tweets; do
  extra=(); [ "$task" = tweets ] && extra=(--set partition.kind=dirichlet --set task.max-examples=1000)
  .venv/bin/fedbridge compare --seeds 0,1,2 --engine simulation --task "$task" "${extra[@]}" --methods local \
    --sweep slm.class-balanced=false,true --set slm.model=embedded,minilm-l3 --out "$OUT/$task"
done
