#!/usr/bin/env bash
# Runs the demo bus: four nodes in one process on the embedded discovery,
# found by name, talking over mem, unix and tcp (`atbus demo`; stop it with
# Ctrl-C). Installs the build prerequisites (protoc) first when missing.
# Extra arguments go to `atbus demo` (e.g. --seconds 10).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
exec cargo run --release --bin atbus -- demo "$@"
