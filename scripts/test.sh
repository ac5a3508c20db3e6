#!/usr/bin/env bash
# keyrotd's test command: installs what the tests need, checks format and lints, and runs every test
# (unit, engine, offline files, fuzz targets over their corpora, and end-to-end against real OpenBao,
# moto, Prometheus/promtool, systemd-analyze, docker-compose and the simulators). `--locked`: the
# lock file is what the Dockerfile builds with (`cargo build --release --locked`).
#
#   ./scripts/test.sh                 # everything
#   TEST_THREADS=2 ./scripts/test.sh  # fewer tests at once (default 4: most end-to-end tests wait on
#                                     # real services, not on the CPU)
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-tools.sh

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --locked --all-targets --features failpoints -- -D warnings
echo "== cargo test (failpoints on: the crash-recovery tests place their kills with them)" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
start=$(date +%s)
cargo test --locked --features failpoints --no-fail-fast --tests -- --test-threads "${TEST_THREADS:-4}" 2>&1 \
  | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
echo "tests took $(( $(date +%s) - start )) s" >&2
exit "$status"
