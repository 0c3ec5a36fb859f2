#!/usr/bin/env bash
# A private CA and a SuperLink server certificate signed by it, for tests and demos.
#
#   deploy/make_certs.sh OUT_DIR [NAME_OR_IP ...]
#
# The certificate is valid for localhost, 127.0.0.1 and ::1 plus every NAME_OR_IP given (the names and addresses
# SuperNodes and `flwr` use to reach the SuperLink). Writes OUT_DIR/ca.crt (give it to every SuperNode and
# to `flwr`), ca.key (keep it offline), server.pem and server.key (SuperLink only). In production use certificates
# from your organisation's CA instead: see docs/deployment.md.
set -euo pipefail

out=${1:?usage: make_certs.sh OUT_DIR [NAME_OR_IP ...]}
shift
days=${CERT_DAYS:-365}
mkdir -p "$out"

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then sans+=",IP:$name"; else sans+=",DNS:$name"; fi
done

# CA: EC P-256 keys are small and fast; any key type the SuperLink's TLS stack accepts works.
openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days "$days" \
  -subj "/O=fedbridge demo CA/CN=fedbridge-ca" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null

openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 \
  -subj "/O=fedbridge/CN=${1:-localhost}" -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
extensions="subjectAltName=$sans
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
  -days "$days" -sha256 -out "$out/server.pem" -extfile <(echo "$extensions") 2>/dev/null

rm -f "$out/server.csr" "$out/ca.srl"
chmod 600 "$out/ca.key" "$out/server.key"
echo "CA: $out/ca.crt  server: $out/server.pem (SANs: $sans)"
