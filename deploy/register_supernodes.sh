#!/usr/bin/env bash
# Register SuperNodes' public keys with the SuperLink (run by the SuperLink operator, through a `flwr` connection
# configured in $FLWR_HOME/config.toml; see docs/deployment.md). A SuperNode whose key is not registered is refused.
# Needs the SuperLink running and the connection written (`fedbridge deploy connection`). Prints each key's node id:
# `flwr supernode list` shows only ids, so keep this "silo-0.pub -> node id" list to tell the silos apart.
#
#   deploy/register_supernodes.sh CONNECTION PUBLIC_KEY [PUBLIC_KEY ...]
set -euo pipefail

connection=${1:?usage: register_supernodes.sh CONNECTION PUBLIC_KEY [PUBLIC_KEY ...]}
shift
[[ $# -gt 0 ]] || { echo "usage: register_supernodes.sh CONNECTION PUBLIC_KEY [PUBLIC_KEY ...]" >&2; exit 2; }
for key in "$@"; do
  name=$(basename "$key" .pub)
  out=$(flwr supernode register "$key" "$connection" --name "$name" --format json) || { echo "$out" >&2; exit 1; }
  id=$(printf '%s' "$out" | python -c 'import json, sys; s = sys.stdin.read(); print(json.loads(s[s.index("{"):])["node-id"])' 2>/dev/null) \
    || { echo "flwr supernode register $key failed: $out" >&2; exit 1; }
  echo "$name: registered, node id $id"
done
