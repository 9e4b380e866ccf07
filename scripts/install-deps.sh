#!/usr/bin/env bash
# Installs the system packages the build and tests need, only when missing.
# Idempotent; uses sudo when not root.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
# etcd-client's build script compiles etcd's protos with protoc.
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# The etcd discovery tests start a real etcd server on free loopback ports.
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# The relay test across network namespaces uses `ip netns` and veth pairs.
command -v ip >/dev/null 2>&1 || need+=(iproute2)

if ((${#need[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
