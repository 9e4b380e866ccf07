#!/usr/bin/env bash
# Runs every check and test of libatbus-rs: formatting, clippy (warnings are
# errors), the build without default features, and the whole test suite.
# Usage: scripts/test.sh   (from anywhere; installs what the tests need)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# One-shot build: incremental caches would only take disk (override to keep them).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step "prerequisites"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy --all-targets --all-features -- -D warnings

step "cargo build --no-default-features"
cargo build --no-default-features --lib

step "cargo test"
cargo test --all-features --no-fail-fast
