#!/bin/bash
# Entrypoint of the mongo image: runs `mongod "$@"`, and when MONGO_REPLSET_HOST is set
# (the host:port clients reach this member at, e.g. mongo3:27017) initiates the one-member
# replica set named by --replSet (idempotent: an initiated set is left alone). SIGTERM and
# SIGINT are passed on to mongod, whose exit status is this script's.
set -uo pipefail
replset=""
prev=""
for a in "$@"; do
  case "$a" in --replSet=*) replset="${a#--replSet=}" ;; esac
  [ "$prev" = "--replSet" ] && replset="$a"
  prev="$a"
done
/usr/local/bin/mongod "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
if [ -n "${MONGO_REPLSET_HOST:-}" ] && [ -n "$replset" ]; then
  if ! python3 /usr/local/lib/oc-mongo/rs.py init "$replset" "$MONGO_REPLSET_HOST"; then
    echo "mongod-rs: replica set $replset not initiated" >&2
  fi
fi
# `wait` returns early when a trapped signal arrives: wait again until mongod is gone.
status=0
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
  status=$?
done
exit "$status"
