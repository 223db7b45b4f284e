#!/bin/bash
# Entrypoint of the node image. With OC_IDENTITY_KEY_FILE set (a read-only mounted
# identity.key, as docker-compose.yml does so that partners know each other's peer ids),
# copies it into an empty data directory; refuses to start when the data directory already
# holds another identity (a regenerated key against an old volume). Then runs
# `oc-discovery "$@"` as PID 1, so SIGTERM reaches the node.
set -euo pipefail
data="${OC_DISCOVERY_DATA_DIR:-/var/lib/oc-discovery}"
if [ -n "${OC_IDENTITY_KEY_FILE:-}" ]; then
  if [ ! -r "$OC_IDENTITY_KEY_FILE" ]; then
    echo "oc-entrypoint: OC_IDENTITY_KEY_FILE=$OC_IDENTITY_KEY_FILE is not readable by uid $(id -u)" >&2
    exit 1
  fi
  mkdir -p "$data"
  if [ ! -e "$data/identity.key" ]; then
    cp "$OC_IDENTITY_KEY_FILE" "$data/identity.key.tmp"
    chmod 600 "$data/identity.key.tmp"
    mv "$data/identity.key.tmp" "$data/identity.key"
  elif ! cmp -s "$OC_IDENTITY_KEY_FILE" "$data/identity.key"; then
    echo "oc-entrypoint: $data/identity.key differs from $OC_IDENTITY_KEY_FILE;" \
         "remove the data volume (docker-compose down -v) or the mount" >&2
    exit 1
  fi
fi
exec /usr/local/bin/oc-discovery "$@"
