#!/usr/bin/env bash
# perf/run.sh [RUNS]: the performance run of perf/RESULTS.md.
#
# Builds in release, then RUNS times (default 3): `atbus bench` for tcp,
# unix, udp and mem at 8, 64, 548, 1024 and 16384 B with the 64 B ping-pong
# and the latency-class cases (each beside its in-run raw baseline), the
# ping-pong again with the shards spinning 50 µs before parking, the
# ping-pong and class cases again with the applications as message handlers
# on the shards (spinning 50 µs before parking), the 64 B and 16 KiB
# throughput cases with the receiving application as a handler (shards
# parking at once: the sender is a thread beside its shard), and
# `atbus-baseline` (perf/baseline.rs) for tcp and unix; once: `atbus-idle`
# (10 000 idle connections). Raw JSON lines go to perf/results/run-<date>.jsonl,
# the summary with the targets to perf/RESULTS.md.
# ATBUS_PERF_SECONDS (default 2) sets the seconds per throughput case.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
per_case=${ATBUS_PERF_SECONDS:-2}

scripts/install-deps.sh
if ! command -v python3 >/dev/null; then
    echo "==> installing python3 (the summary is written by perf/summarize.py)"
    apt-get update -qq && apt-get install -y -qq python3-minimal
fi
cargo build --release --bin atbus --bin atbus-baseline --bin atbus-idle

stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
out=perf/results/run-$stamp.jsonl
mkdir -p perf/results
: > "$out"
tag() { sed "s/^{/{\"run\":$1,/"; }
for run in $(seq 1 "$runs"); do
    echo "==> run $run of $runs: atbus bench"
    target/release/atbus bench --transport tcp --transport unix --transport udp --transport mem \
        --size 8 --size 64 --size 548 --size 1024 --size 16384 \
        --seconds "$per_case" --class | tag "$run" >> "$out"
    echo "==> run $run of $runs: atbus bench --pingpong --spin-us 50 (queue API, shards spinning)"
    target/release/atbus bench --transport tcp --transport unix --pingpong \
        --spin-us 50 | tag "$run" >> "$out"
    echo "==> run $run of $runs: atbus bench --handler (applications on the shards)"
    target/release/atbus bench --transport tcp --transport unix --pingpong --class \
        --handler --handler-only --spin-us 50 | tag "$run" >> "$out"
    echo "==> run $run of $runs: atbus bench --handler --throughput-only (b's application a handler)"
    target/release/atbus bench --transport tcp --transport unix --throughput-only \
        --size 64 --size 16384 --seconds "$per_case" \
        --handler --handler-only | tag "$run" >> "$out"
    echo "==> run $run of $runs: atbus-baseline"
    target/release/atbus-baseline --transport tcp --transport unix \
        --size 8 --size 64 --size 548 --size 1024 --size 16384 \
        --seconds "$per_case" | tag "$run" >> "$out"
done
echo "==> atbus-idle: 10 000 idle connections"
# One descriptor per connection in each of its two processes.
ulimit -n 10200 2>/dev/null || ulimit -n "$(ulimit -Hn)"
target/release/atbus-idle --connections 10000 | grep '^{' | tag 1 >> "$out"

commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock perf/raw.rs perf/baseline.rs perf/idle.rs || echo "+changes")
python3 perf/summarize.py "$out" "$commit" "$(date -u +%Y-%m-%d)" > perf/RESULTS.md
echo "==> perf/RESULTS.md written (raw lines: $out)"
