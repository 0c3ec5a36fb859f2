#!/usr/bin/env bash
# One SuperNode authentication key pair per name: OUT_DIR/NAME (private, stays on that SuperNode's host) and
# OUT_DIR/NAME.pub (public, registered at the SuperLink with `flwr supernode register`).
#
#   deploy/make_supernode_keys.sh OUT_DIR NAME [NAME ...]      e.g. make_supernode_keys.sh keys silo-0 silo-1
#
# Flower 1.41 expects an elliptic-curve key in OpenSSH format. Best practice: run this on each SuperNode's host
# for its own name, and send only the .pub file to the SuperLink operator.
set -euo pipefail

out=${1:?usage: make_supernode_keys.sh OUT_DIR NAME [NAME ...]}
shift
[[ $# -gt 0 ]] || { echo "usage: make_supernode_keys.sh OUT_DIR NAME [NAME ...]" >&2; exit 2; }
mkdir -p "$out"
for name in "$@"; do
  rm -f "$out/$name" "$out/$name.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$out/$name"
  echo "key: $out/$name  public: $out/$name.pub"
done
