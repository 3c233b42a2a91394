#!/usr/bin/env bash
# README's test command, and CI's: installs the real proxy cores the integration tests
# run against (scripts/install-peers.sh: V2Ray from Debian, the Xray wheel in a venv),
# then runs exactly `cargo test --locked --workspace` (the product and the queue crate)
# with CONNECTOR_XRAY_PYTHON pointing at the venv. Installing V2Ray needs root; without
# the peers, plain `cargo test --locked --workspace` runs
# too and skips the real-core tests with a loud SKIPPED line (CI=true fails them).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-peers.sh
export CONNECTOR_XRAY_PYTHON="$PWD/target/peers/venv/bin/python"
cargo test --locked --workspace
