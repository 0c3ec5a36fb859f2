#!/usr/bin/env bash
# One silo's SuperNode: verifies the SuperLink's certificate, authenticates with its private key, and points the
# silo at its own data file. The file is read on this host only; the data never leaves it.
#
#   deploy/start_supernode.sh SUPERLINK CA_CERT PRIVATE_KEY NODE_CONFIG [flower-supernode options ...]
#   e.g. deploy/start_supernode.sh superlink.example.org:9093 ca.crt keys/silo-0 \
#          'partition-id=0 data-path="/data/silo.csv" text-column="review" label-column="rating"'
#
# Two SuperNodes on one host need different --port values (each serves its ClientApps' runtime API there).
set -euo pipefail

superlink=${1:?usage: start_supernode.sh SUPERLINK CA_CERT PRIVATE_KEY NODE_CONFIG [options ...]}
ca=${2:?missing CA_CERT}
key=${3:?missing PRIVATE_KEY}
node_config=${4:?missing NODE_CONFIG}
shift 4
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-supernode --superlink "$superlink" --root-certificates "$ca" --auth-supernode-private-key "$key" \
  --node-config "$node_config" "$@"
