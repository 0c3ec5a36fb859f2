#!/usr/bin/env bash
# Issue 3's comparison: FDKT's two mechanisms over the privacy budget vs local and fedavg on drug-reviews, 4 natural
# silos with mixed SLMs (MiniLM-L6 / MiniLM-L3 alternating, as in crosslm_compare.sh), seeds 0-2, Flower's simulation
# engine, reduced FDKT sizes (one DP demonstration per label per silo, 32 tokens, 2 groups, one pooled augmented set
# of 8 per label) so that a run takes minutes on 2 CPU cores. Runs in priority order; a rerun skips what is done.
#   bash benchmarks/fdkt_compare.sh [OUT]      (default benchmarks/results/fdkt-compare)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/fdkt-compare}
MIXED="--set slm.model=embedded,minilm-l3"
FDKT="--set fdkt.num-per-label=1 --set fdkt.max-tokens=32 --set fdkt.groups=2 --set fdkt.pooled=true --set fdkt.augment-per-label=8"
DPSGD="--sweep fdkt.mechanism=dp-sgd --set fdkt.sgd-epochs=1"  # swept, so that the run names say dp-sgd
run() {  # run SEEDS ARGS...: one fedbridge compare on drug-reviews into OUT
  local seeds=$1; shift
  .venv/bin/fedbridge compare --seeds "$seeds" --engine simulation --task drug-reviews "$@" --out "$OUT"
}
run 0,1,2 --methods local,fdkt $MIXED $FDKT                      # fdkt at its defaults: dp-fewshot, epsilon 4
run 0,1,2 --methods fedavg                                        # fedavg averages one architecture: MiniLM-L6
run 0,1,2 --methods fdkt --sweep fdkt.epsilon=1,8,inf $MIXED $FDKT          # dp-fewshot: ~5 min a run
for seed in 0 1 2; do  # dp-sgd: ~10-15 min a run; a seed at every epsilon before the next seed
  run $seed --methods fdkt --sweep fdkt.epsilon=1,4,8,inf $MIXED $FDKT $DPSGD
done
# One table over all of it, rows by mechanism and epsilon; the plot is accuracy vs epsilon.
.venv/bin/fedbridge compare --only-aggregate --sweep fdkt.epsilon=1,4,8,inf --sweep fdkt.mechanism=dp-fewshot,dp-sgd --out "$OUT"
