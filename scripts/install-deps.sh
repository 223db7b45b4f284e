#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine with Rust:
# nats-server from Debian's packages. Idempotent; needs root (or sudo) only to install.
set -euo pipefail

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "run as root to install: $*" >&2; exit 1; fi
}

if ! command -v nats-server >/dev/null && [ ! -x /usr/sbin/nats-server ]; then
  echo "installing nats-server (Debian package)"
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server
fi
