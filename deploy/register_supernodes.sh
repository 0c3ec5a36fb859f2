#!/usr/bin/env bash
# Register SuperNodes' public keys with the SuperLink (run by the SuperLink operator, through a `flwr` connection
# configured in $FLWR_HOME/config.toml; see docs/deployment.md). A SuperNode whose key is not registered is refused.
#
#   deploy/register_supernodes.sh CONNECTION PUBLIC_KEY [PUBLIC_KEY ...]
set -euo pipefail

connection=${1:?usage: register_supernodes.sh CONNECTION PUBLIC_KEY [PUBLIC_KEY ...]}
shift
[[ $# -gt 0 ]] || { echo "usage: register_supernodes.sh CONNECTION PUBLIC_KEY [PUBLIC_KEY ...]" >&2; exit 2; }
for key in "$@"; do
  flwr supernode register "$key" "$connection" --name "$(basename "$key" .pub)"
done
