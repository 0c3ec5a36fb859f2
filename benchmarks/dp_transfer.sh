#!/usr/bin/env bash
# Issue 23: the equal-privacy comparison. Tweets (1,000 tweets, 4 Dirichlet(0.5) silos: centralized is ~20 F1 above
# local) with one SLM architecture (MiniLM-L6, so weight sharing applies): local, centralized, fedavg (ε = ∞),
# DP-FedAvg (fedavg + slm.dp-epsilon) and Private Evolution (pe) at the same ε per silo; then the gain against the
# number of synthetic examples a silo gets. In-process engine (the same method code as Flower's simulation engine,
# without Ray's start-up). Runs in priority order; a rerun skips what is done (each line is one `fedbridge compare`,
# which keeps finished records). Then one table and the F1-vs-ε plot over all of it.
#   bash benchmarks/dp_transfer.sh [OUT]      (default benchmarks/results/dp-transfer)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/dp-transfer}
TWEETS="--task tweets --set partition.kind=dirichlet --set task.max-examples=1000 --engine inprocess"
compare() { .venv/bin/fedbridge compare "$@" --out "$OUT/tweets"; }
compare --methods local,centralized,fedavg --seeds 0,1,2 $TWEETS                    # the references
compare --methods fedavg --seeds 0,1,2 --sweep slm.dp-epsilon=4 $TWEETS             # DP-FedAvg at ε = 4
compare --methods pe --seeds 0,1,2 --sweep pe.epsilon=4 $TWEETS                     # the headline, the same ε
compare --methods pe,fedavg --seeds 0 --sweep pe.epsilon=1,8 --sweep slm.dp-epsilon=1,8 $TWEETS  # other ε, seed 0
compare --methods pe --seeds 0 --sweep pe.num-per-label=8,64 --sweep pe.epsilon=4 $TWEETS  # volume, seed 0
compare --methods local,centralized,fedavg,pe --only-aggregate --sweep pe.epsilon=1,4,8 \
  --sweep slm.dp-epsilon=1,4,8,inf --sweep pe.num-per-label=8,32,64
.venv/bin/python benchmarks/synthetic_quality.py "$OUT/tweets" --out "$OUT/synthetic-quality.md"
