#!/usr/bin/env bash
# keyrotd's demo: a whole stack on loopback, rotating a key of each kind every 30 seconds.
#
#   OpenBao (dev mode)        http://127.0.0.1:18200   the Vault KV v2 destination
#   moto                      http://127.0.0.1:15000   the AWS Secrets Manager destination
#   portal simulator          http://127.0.0.1:18080   issues and regenerates the key
#   dependent "billing-worker" http://127.0.0.1:18081  reads the key from OpenBao on reload
#   dependent "edge-proxy"    http://127.0.0.1:18082   reads the key from AWS on reload
#   vendor simulator          http://127.0.0.1:18090   keeps two keys live (create, list, revoke)
#   dependent "payments-worker" http://127.0.0.1:18083 reads the vendor's key from OpenBao on reload
#   keyrotd run               http://127.0.0.1:9464    metrics, health, admin API
#
# Installs what it needs (scripts/install-tools.sh), builds keyrotd, starts everything, and runs the
# daemon in the foreground with config/demo.toml. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

./scripts/install-tools.sh
echo "demo: building keyrotd" >&2
cargo build --bins --quiet
BIN=$ROOT/target/debug
VENV=$ROOT/.tools/venv/bin

for port in 18200 15000 18080 18081 18082 18083 18090 9464; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is already in use (another demo running?); stop it first" >&2
    exit 1
  fi
done

rm -rf .demo && mkdir -p .demo/keys .demo/logs
token() { head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
export VAULT_TOKEN="demo-root-$(token)"
export AOS_MANAGEMENT_TOKEN="demo-mgmt-$(token)"
export KEYROTD_ADMIN_TOKEN="demo-admin-$(token)"
export DEMO_HOOK_KEY="demo-hook-$(token)"
export VENDOR_MANAGEMENT_TOKEN="demo-vendor-$(token)"
export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=eu-central-2 AWS_EC2_METADATA_DISABLED=true
# The demo's credentials, for the commands printed below (never printed themselves).
( umask 077
  { echo "export VAULT_TOKEN=$VAULT_TOKEN AOS_MANAGEMENT_TOKEN=$AOS_MANAGEMENT_TOKEN"
    echo "export KEYROTD_ADMIN_TOKEN=$KEYROTD_ADMIN_TOKEN DEMO_HOOK_KEY=$DEMO_HOOK_KEY"
    echo "export VENDOR_MANAGEMENT_TOKEN=$VENDOR_MANAGEMENT_TOKEN"
    echo "export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=eu-central-2"
  } > .demo/env )

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  echo >&2
  echo "demo: stopping everything it started" >&2
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_http() { # url, name
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "demo: $2 did not come up; see .demo/logs/" >&2
  exit 1
}

"$VENV/bao" server -dev -dev-root-token-id="$VAULT_TOKEN" -dev-listen-address=127.0.0.1:18200 \
  >.demo/logs/openbao.log 2>&1 &
PIDS+=($!)
"$VENV/moto_server" -H 127.0.0.1 -p 15000 >.demo/logs/moto.log 2>&1 &
PIDS+=($!)
"$BIN/keyrotd-sim" portal --listen 127.0.0.1:18080 --token-env AOS_MANAGEMENT_TOKEN >.demo/logs/portal.log 2>&1 &
PIDS+=($!)
"$BIN/keyrotd-sim" vendor --listen 127.0.0.1:18090 --token-env VENDOR_MANAGEMENT_TOKEN >.demo/logs/vendor.log 2>&1 &
PIDS+=($!)
wait_http http://127.0.0.1:18200/v1/sys/health OpenBao
wait_http http://127.0.0.1:18090/_sim/state "the vendor simulator"
wait_http http://127.0.0.1:15000/moto-api/ moto
wait_http http://127.0.0.1:18080/_sim/state "the portal simulator"

# keyrotd never creates AWS secrets: an operator creates them, as here.
"$VENV/python" - <<'PY'
import boto3
c = boto3.client("secretsmanager", endpoint_url="http://127.0.0.1:15000", region_name="eu-central-2")
c.create_secret(Name="demo/billing-api", SecretString="{}")
PY

"$BIN/keyrotd-sim" dependent --listen 127.0.0.1:18081 --portal http://127.0.0.1:18080 --source vault \
  --vault-addr http://127.0.0.1:18200 --vault-path demo/billing-api --vault-field api_key \
  --signing-key-env DEMO_HOOK_KEY >.demo/logs/billing-worker.log 2>&1 &
PIDS+=($!)
"$BIN/keyrotd-sim" dependent --listen 127.0.0.1:18082 --portal http://127.0.0.1:18080 --source aws \
  --aws-endpoint http://127.0.0.1:15000 --aws-secret-id demo/billing-api --aws-field api_key \
  --signing-key-env DEMO_HOOK_KEY >.demo/logs/edge-proxy.log 2>&1 &
PIDS+=($!)
# The vendor's key has no value anywhere yet: keyrotd's first rotation of payments-api creates one.
"$BIN/keyrotd-sim" dependent --listen 127.0.0.1:18083 --portal http://127.0.0.1:18090 --source vault \
  --vault-addr http://127.0.0.1:18200 --vault-path demo/payments-api --vault-field api_key \
  --signing-key-env DEMO_HOOK_KEY >.demo/logs/payments-worker.log 2>&1 &
PIDS+=($!)
wait_http http://127.0.0.1:18081/_sim/state billing-worker
wait_http http://127.0.0.1:18083/_sim/state payments-worker
wait_http http://127.0.0.1:18082/_sim/state edge-proxy

cat >&2 <<EOF

demo: the stack is up. keyrotd now rotates "billing-api" (AOS portal: the old key dies at regenerate)
and "payments-api" (a vendor with two live keys: the old key goes once the dependent confirmed the
new one) every 30 seconds. In another terminal:
  target/debug/keyrotd -c config/demo.toml plan                  # the next rotations
  curl -s http://127.0.0.1:9464/v1/keys | python3 -m json.tool   # live view: phase, destinations, drift
  curl -s http://127.0.0.1:9464/metrics | grep '^keyrotd_'       # Prometheus metrics
  curl -s http://127.0.0.1:18080/_sim/state                     # the portal's truth (auth ok/failed)
  . .demo/env; target/debug/keyrotd -c config/demo.toml status   # the portal beside every destination
  . .demo/env; target/debug/keyrotd -c config/demo.toml rotate billing-api --reason "demo: on demand"
  curl -s -XPOST http://127.0.0.1:18080/_sim/rotate            # rotate out of band: reconcile repairs it
  curl -s -XPOST http://127.0.0.1:18080/_sim/faults -d '{"regenerate":{"lose_next":1}}'   # lose a key
  curl -s http://127.0.0.1:18090/_sim/state                     # the vendor's live keys: two while they overlap
  curl -s -XPOST http://127.0.0.1:18083/_sim/faults -d '{"ignore_reload":true}'   # never confirm: old key kept
Logs of the other components: .demo/logs/. Audit log: .demo/state/audit.jsonl. Ctrl-C stops the demo.

EOF

"$BIN/keyrotd" -c config/demo.toml run &
PIDS+=($!)
wait "${PIDS[-1]}"
