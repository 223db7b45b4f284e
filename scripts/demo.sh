#!/usr/bin/env bash
# The main job of the README: a local three-site demo on the embedded store.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --bin oc-discovery --example demo
exec ./target/debug/examples/demo
