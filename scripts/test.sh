#!/usr/bin/env bash
# keyrotd's test command: installs what the tests need, checks format and lints, builds the release
# binary exactly as the Dockerfile does, and runs every test (unit, and end-to-end against real
# OpenBao, moto, Prometheus/promtool, systemd-analyze, docker-compose and the simulators).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-tools.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --all-targets --features failpoints -- -D warnings
echo "== cargo build --release --locked (the Dockerfile's build stage)" >&2
cargo build --release --locked
echo "== cargo test (failpoints on: the crash-recovery tests place their kills with them)" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --features failpoints --no-fail-fast --tests 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
