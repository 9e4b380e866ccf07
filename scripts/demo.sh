#!/usr/bin/env bash
# Runs the demo bus: three nodes (tcp, unix, mem) exchanging messages in one
# process. Installs the build prerequisites (protoc) first when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release --example demo
