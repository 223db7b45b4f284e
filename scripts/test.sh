#!/usr/bin/env bash
# The test command of the README: installs what the tests need, then runs every test
# against real nats-server processes and real libp2p connections on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo test --workspace --all-targets -- --test-threads=2
