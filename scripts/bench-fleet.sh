#!/usr/bin/env bash
# keyrotd's fleet benchmark (benches/fleet.rs): the release keyrotd with a fleet of keys, each with its
# own `aos` provider on a multi-account portal simulator, against real OpenBao and moto. Prints, per
# fleet size: every key rotated at once through the admin API, memory (VmRSS/VmHWM), start-up to
# /readyz, idle CPU, CPU per rotation, portal/Vault/AWS requests per rotation and check-config time.
#
#   scripts/bench-fleet.sh                   # 1,000 keys (Vault, AWS and file destinations), 10,000 (file)
#   scripts/bench-fleet.sh 200 5000:file     # other sizes; ":file" = file destinations only
#
# Environment (see benches/fleet.rs): IDLE_SECS (default 30), FLEET_DAEMON_EXTRA / FLEET_KEY_EXTRA
# (TOML lines added to [daemon] / every [[keys]]), KEYROTD_NOFILE=1024 (keyrotd's open-files limit, as
# systemd's default soft limit), KEEP_BENCH_DIR=1 (keep the temporary directory with
# the config, the state and every process's log). Everything runs in a temporary directory; every
# process the benchmark starts is stopped when it ends, fails or is interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-tools.sh
export FLEET="${*:-1000 10000:file}"
echo "bench-fleet: building the release keyrotd, keyrotd-sim and the benchmark" >&2
cargo bench --bench fleet --no-run --quiet
echo "bench-fleet: fleets \"$FLEET\"; open-files limit $(ulimit -n)" >&2

# In a process group of its own, so an interrupted run takes OpenBao, moto, the simulators and
# keyrotd down with it (a normal end or a failure stops them from inside).
setsid cargo bench --quiet --bench fleet &
pid=$!
stop() {
  trap - INT TERM
  kill -TERM -- "-$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  exit 130
}
trap stop INT TERM
wait "$pid"
