#!/usr/bin/env bash
# Runs keyrotd's fuzz targets (fuzz/) for a bounded time each; exits non-zero on any finding.
#
#   scripts/fuzz.sh                 # every target, 20 s each (about 60 s of fuzzing in all)
#   scripts/fuzz.sh --seconds 300   # longer runs
#   scripts/fuzz.sh --keep          # add the new interesting inputs to fuzz/corpus/ (to commit)
#   scripts/fuzz.sh config_load     # one target
#
# Needs the nightly toolchain (libFuzzer instrumentation); installs cargo-fuzz when it is missing.
# Targets are built without a sanitizer: keyrotd forbids unsafe code, so the findings that matter are
# panics, hangs (-timeout) and runaway memory (-rss_limit_mb), which libFuzzer catches on its own.
# A crashing input is written to fuzz/artifacts/TARGET/; keep it as a regression case in
# fuzz/corpus/TARGET/ once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=20
keep=0
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
if [ ${#targets[@]} -eq 0 ]; then
    targets=(config_load provider_responses admin_request journal_load)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "== building the fuzz targets" >&2
(cd fuzz && cargo +nightly fuzz build --sanitizer none)

failed=0
for t in "${targets[@]}"; do
    new=$(mktemp -d)
    echo "== fuzz $t for ${seconds}s" >&2
    # New inputs go to a scratch directory first; the kept corpus is only read.
    if (cd fuzz && cargo +nightly fuzz run --sanitizer none "$t" "$new" "corpus/$t" -- \
            -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
            >"$new.log" 2>&1); then
        grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$new.log" | tail -2 >&2 || true
        echo "fuzz $t: no finding" >&2
    else
        tail -40 "$new.log" >&2
        echo "fuzz $t: FINDING (see fuzz/artifacts/$t/)" >&2
        failed=$((failed + 1))
    fi
    if [ "$keep" = 1 ]; then
        cp -n "$new"/* "fuzz/corpus/$t/" 2>/dev/null || true
    fi
    rm -rf "$new" "$new.log"
done
echo "fuzz: ${#targets[@]} targets, $failed with findings" >&2
[ "$failed" -eq 0 ]
