#!/usr/bin/env bash
# The SuperLink, with TLS and SuperNode authentication (only registered SuperNodes may connect).
#
#   deploy/start_superlink.sh CERT_DIR STATE_DB [flower-superlink options ...]
#   e.g. deploy/start_superlink.sh certs /var/lib/fedbridge/superlink.db --host 0.0.0.0 --port 9093
#
# CERT_DIR holds ca.crt, server.pem and server.key (deploy/make_certs.sh, or your organisation's CA).
# STATE_DB keeps registered SuperNodes and runs across restarts (its directory is created if missing). Runtime
# dependency installation is off:
# the ServerApp runs in this environment (fedbridge installed), never in one `uv sync` builds per run.
set -euo pipefail

certs=${1:?usage: start_superlink.sh CERT_DIR STATE_DB [options ...]}
db=${2:?usage: start_superlink.sh CERT_DIR STATE_DB [options ...]}
shift 2
mkdir -p "$(dirname "$db")"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec flower-superlink \
  --ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/server.pem" --ssl-keyfile "$certs/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation --database "$db" "$@"
