# Runtime image of the oc-discovery node.
#
# The binary is built on the host and copied in, not compiled here: the crate needs Rust
# 1.89+ (rust-version in Cargo.toml) and Debian bookworm's rustc is older, while these
# machines cannot pull a rust:* image. Build it on a Debian 12 (glibc 2.36) host:
#
#   cargo build --release --bin oc-discovery
#   docker build -t oc-discovery:local .                       # needs debian:bookworm-slim
#   docker build -t oc-discovery:local --build-arg BASE_IMAGE=oc-local/debian:bookworm .
#
# ./scripts/docker-prepare.sh does all of it with a locally made base image (debootstrap +
# docker import), since no image can be pulled here. With a binary elsewhere (another
# CARGO_TARGET_DIR) the script stages it at target/release/oc-discovery in a small
# build context.
#
# Nothing but the binary and two shell scripts is added to the base: no compiler, no
# package manager run, no curl (the health check uses bash's /dev/tcp).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG NODE_UID=10001
RUN groupadd --system --gid ${NODE_UID} oc \
 && useradd --system --uid ${NODE_UID} --gid oc --home-dir /var/lib/oc-discovery \
      --no-create-home --shell /usr/sbin/nologin oc \
 && mkdir -p /var/lib/oc-discovery /etc/oc-discovery \
 && chown oc:oc /var/lib/oc-discovery

COPY target/release/oc-discovery /usr/local/bin/oc-discovery
COPY docker/node/entrypoint.sh /usr/local/bin/oc-entrypoint
COPY docker/node/healthcheck.sh /usr/local/bin/oc-healthcheck

# Every `oc-discovery run` option is an OC_DISCOVERY_* variable (see the README's table);
# these are the ones a container needs different from the defaults: the data directory in
# the volume, and the admin API reachable from outside the container. Listening on 0.0.0.0,
# the node refuses to start without an admin token: mount one and set
# OC_DISCOVERY_ADMIN_TOKEN_FILE (docker-compose.yml does), or set
# OC_DISCOVERY_ADMIN_LISTEN=127.0.0.1:8650 to keep the API inside the container.
ENV OC_DISCOVERY_DATA_DIR=/var/lib/oc-discovery \
    OC_DISCOVERY_ADMIN_LISTEN=0.0.0.0:8650 \
    OC_DISCOVERY_LISTEN=/ip4/0.0.0.0/tcp/4001 \
    RUST_LOG=info

# identity.key and the embedded store (redb).
VOLUME ["/var/lib/oc-discovery"]
# libp2p, admin HTTP API (/healthz, /api/*, /metrics).
EXPOSE 4001 8650

USER oc
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 CMD ["oc-healthcheck"]
# The entrypoint copies a mounted identity into an empty data volume (OC_IDENTITY_KEY_FILE,
# used by docker-compose.yml for fixed peer ids), then execs `oc-discovery "$@"`.
ENTRYPOINT ["oc-entrypoint"]
CMD ["run"]
