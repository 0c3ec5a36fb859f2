#!/usr/bin/env bash
# Issue 23: the equal-privacy comparison. Tweets (1,000 tweets, 4 Dirichlet(0.5) silos: centralized is ~20 F1 above
# local) with one SLM architecture (MiniLM-L6, so weight sharing applies): local, centralized, fedavg (ε = ∞),
# DP-FedAvg (fedavg + slm.dp-epsilon), CrossLM with DP-vote scores and Private Evolution (pe) at the same ε per silo;
# the other ε, the volume and one iteration on seed 0; drug-reviews; how well the votes label LLM text. In-process
# engine (the same method code as Flower's simulation engine, without Ray's start-up). Runs in priority order; a
# rerun skips what is done (each line is one `fedbridge compare`, which keeps finished records). Then the tables.
#   bash benchmarks/dp_transfer.sh [OUT]      (default benchmarks/results/dp-transfer)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/dp-transfer}
TWEETS="--task tweets --set partition.kind=dirichlet --set task.max-examples=1000 --engine inprocess"
compare() { .venv/bin/fedbridge compare "$@" --out "$OUT/tweets"; }
compare --methods local,centralized,fedavg --seeds 0,1,2 $TWEETS                    # the references
compare --methods fedavg --seeds 0,1,2 --sweep slm.dp-epsilon=4 $TWEETS             # DP-FedAvg at ε = 4
compare --methods pe --seeds 0,1,2 --sweep pe.epsilon=4 $TWEETS                     # the headline, the same ε
compare --methods fedavg --seeds 0 --sweep slm.dp-epsilon=1,8 $TWEETS               # other ε, seed 0
compare --methods pe --seeds 0 --sweep pe.epsilon=1,8,inf $TWEETS
compare --methods crosslm --seeds 0,1,2 --sweep crosslm.epsilon=4 $TWEETS           # CrossLM with DP-vote scores
compare --methods pe --seeds 0 --sweep pe.iterations=1 --sweep pe.epsilon=4 $TWEETS # one iteration
compare --methods pe --seeds 0 --sweep pe.num-per-label=8,64 --sweep pe.epsilon=4 $TWEETS  # volume
.venv/bin/fedbridge compare --methods local,pe --seeds 0,1,2 --task drug-reviews --engine inprocess \
  --out "$OUT/drug-reviews"
.venv/bin/python benchmarks/vote_labels.py --out "$OUT"
# Session 3: the ε grid on all 3 seeds, CrossLM at every ε, drug-reviews' other rows
compare --methods fedavg --seeds 0,1,2 --sweep slm.dp-epsilon=1,8 $TWEETS
compare --methods pe --seeds 0,1,2 --sweep pe.epsilon=1,8 $TWEETS
compare --methods crosslm --seeds 0,1,2 --sweep crosslm.epsilon=1,8 $TWEETS
DRUGS="--task drug-reviews --engine inprocess --out $OUT/drug-reviews"
.venv/bin/fedbridge compare --methods centralized,fedavg,crosslm --seeds 0,1,2 $DRUGS
.venv/bin/fedbridge compare --methods fedavg --seeds 0,1,2 --sweep slm.dp-epsilon=4 $DRUGS
# FDKT with the silos' DP votes as labels, and the pipeline, at their defaults: ε = 4 + 4 per silo (basic
# composition), beside the ε = 8 rows. Seed 0 only (~17 min a run with other jobs on the machine). At 2 + 2, FDKT's DP
# few-shot demonstrations run to their full 48 tokens one noisy query at a time (~10 min per silo): stopped.
compare --methods fdkt --seeds 0 $TWEETS
compare --methods pipeline --seeds 0 $TWEETS
compare --only-aggregate --sweep pe.epsilon=1,4,8,inf --sweep slm.dp-epsilon=1,4,8,inf \
  --sweep pe.num-per-label=8,32,64 --sweep pe.iterations=1,2 --sweep crosslm.epsilon=1,2,4,8 \
  --sweep fdkt.epsilon=2,4 --sweep fdkt.vote-epsilon=2 --sweep fdkt.labels=llm  # table.md, f1-vs-epsilon.png
.venv/bin/python benchmarks/dp_transfer_table.py "$OUT/tweets" "$OUT/drug-reviews" --out "$OUT/equal-privacy.md"
