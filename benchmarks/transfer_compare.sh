#!/usr/bin/env bash
# Issue 13's re-measurement of every method on the SLM recipe, and issue 14's pipeline beside FDKT and CrossLM:
# FDKT's epsilon grid (1, 4, 8, inf x dp-fewshot, dp-sgd) and CrossLM's grid (KL on / off, with-private) against
# local, fedavg and centralized, on drug-reviews (4 natural silos) and tweets (1,000 tweets, 4 Dirichlet(0.5)
# silos), seeds 0-2, Flower's simulation engine.
# SLMs: MiniLM-L6 / MiniLM-L3 alternating (fedavg and centralized need one architecture: MiniLM-L6), the default
# slm.* recipe. FDKT at reduced sizes (one DP demonstration per label per silo, 32 tokens, 2 groups, one pooled
# augmented set of 8 per label), so a run takes minutes on 2 CPU cores. Runs in priority order; a rerun skips what
# is done (each row is one `fedbridge compare`, which keeps finished records).
#   bash benchmarks/transfer_compare.sh [OUT]      (default benchmarks/results/transfer)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/transfer}
MIXED="--set slm.model=embedded,minilm-l3"
FDKT="--set fdkt.num-per-label=1 --set fdkt.max-tokens=32 --set fdkt.groups=2 --set fdkt.pooled=true --set fdkt.augment-per-label=8"
DPSGD="--sweep fdkt.mechanism=dp-sgd --set fdkt.sgd-epochs=1"  # swept, so that the run names say dp-sgd
run() {  # run TASK ARGS...: one fedbridge compare over seeds 0-2 into OUT/TASK
  local task=$1; shift
  local extra=(); [ "$task" = tweets ] && extra=(--set partition.kind=dirichlet --set task.max-examples=1000)
  .venv/bin/fedbridge compare --seeds 0,1,2 --engine simulation --task "$task" "${extra[@]}" "$@" --out "$OUT/$task"
}
for task in drug-reviews tweets; do  # the headline: local, FDKT at epsilon 4, CrossLM at its defaults
  run "$task" --methods local,fdkt $MIXED $FDKT
  run "$task" --methods crosslm $MIXED
done
for task in drug-reviews tweets; do  # the pipeline: FDKT's DP demonstrations (same sizes) seed CrossLM's batches
  run "$task" --methods pipeline $MIXED $FDKT
done
for task in drug-reviews tweets; do  # how the gain grows with the synthetic examples a silo gets (epsilon 4)
  run "$task" --methods fdkt --sweep fdkt.augment-per-label=32 $MIXED $FDKT
  run "$task" --methods fdkt --sweep fdkt.augment-per-label=2 $MIXED $FDKT
done
for task in drug-reviews tweets; do  # the baselines' ordering (one architecture: MiniLM-L6)
  run "$task" --methods fedavg,centralized
done
for task in drug-reviews tweets; do  # the paper's step 5 alone, and what the synthetic data can do without noise
  run "$task" --methods crosslm --sweep crosslm.with-private=false $MIXED
  run "$task" --methods fdkt --sweep fdkt.epsilon=inf $MIXED $FDKT
done
for task in drug-reviews tweets; do  # KL off; FDKT's noise levels around 4
  run "$task" --methods crosslm --sweep crosslm.kl-weight=0 $MIXED
  run "$task" --methods fdkt --sweep fdkt.epsilon=1,8 $MIXED $FDKT
done
for task in drug-reviews tweets; do  # the other mechanism (the slowest runs, so last)
  run "$task" --methods fdkt --sweep fdkt.epsilon=4 $MIXED $FDKT $DPSGD
  run "$task" --methods fdkt --sweep fdkt.epsilon=1,8,inf $MIXED $FDKT $DPSGD
done
for task in drug-reviews tweets; do  # one table per task over all of it; what the server sent, judged
  .venv/bin/fedbridge compare --only-aggregate --sweep fdkt.epsilon=1,4,8,inf --out "$OUT/$task"
done
.venv/bin/python benchmarks/synthetic_quality.py "$OUT/drug-reviews" "$OUT/tweets" --out "$OUT/synthetic-quality.md"
