#!/usr/bin/env bash
# keyrotd's chaos soak: the real daemon with 20 keys against real OpenBao, moto and the simulators,
# with random faults from a seed in the portals, the stores, the reload hooks and the process itself,
# and its invariants checked all along and at the end (tests/e2e/soak/mod.rs says which).
#
#   scripts/soak.sh                        # 30 minutes, a random seed (printed)
#   scripts/soak.sh --minutes 10 --seed 42 # the same sequence of faults as any run with seed 42
#   scripts/soak.sh --keep                 # keep the logs, journals and audit log (path printed)
#
# Prints, at the end: seed, minutes, rotations (by outcome), faults injected (by kind), invariant
# checks made, and the result; exits non-zero when an invariant broke. The test command runs the same
# soak for 2 minutes with a fixed seed (soak::two_minutes_with_a_fixed_seed).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=30
seed=""
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) minutes="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "soak.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$minutes" in ''|*[!0-9.]*) echo "soak.sh: --minutes takes a number" >&2; exit 2 ;; esac
if [ -z "$seed" ]; then
    seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fi
case "$seed" in *[!0-9]*) echo "soak.sh: --seed takes an unsigned integer" >&2; exit 2 ;; esac

./scripts/install-tools.sh
echo "soak.sh: seed $seed, $minutes minutes" >&2
export SOAK_MINUTES="$minutes" SOAK_SEED="$seed"
if [ "$keep" = 1 ]; then export SOAK_KEEP=1; fi
exec cargo test --features failpoints --test e2e soak::from_the_environment -- \
    --ignored --exact --nocapture
