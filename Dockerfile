# syntax=docker/dockerfile:1.7
#
# Fleet's images: the workspace is built once (stage `builder`), and every binary gets its own
# small runtime image, one build target each:
#
#   docker build --target edge-api        -t fleet/edge-api:dev .
#   docker build --target dispatcher      -t fleet/dispatcher:dev .
#   docker build --target callback-worker -t fleet/callback-worker:dev .
#   docker build --target ws-gateway      -t fleet/ws-gateway:dev .
#   docker build --target exec-worker     -t fleet/exec-worker:dev .
#   docker build --target nats-bridge     -t fleet/nats-bridge:dev .
#   docker build --target fleetctl        -t fleet/fleetctl:dev .      (the CLI, for one-off jobs)
#
# Convention, relied on by deploy/compose and deploy/k8s and checked by
# tests/e2e/tests/deploy_manifests.rs: the image of binary B is built from target B and named
# fleet/B[:tag] (a registry may be put in front: registry.example.com/fleet/B:tag).
# With BuildKit (the default builder since Docker 23), building several targets, or
# `docker compose build`, runs the `builder` stage once and reuses it for every image.
#
# Runtime images: distroless `cc` (glibc, libgcc, CA certificates, no shell, no package manager),
# running as the unprivileged user 65532 (nonroot). Nothing in them needs a shell: the
# HEALTHCHECK is `fleet-healthcheck` (deploy/docker/healthcheck.rs, std-only, built here with
# rustc), which reads the same *_ADDR variable the binary listens on and GETs /health/ready.
# Kubernetes does not use HEALTHCHECK: deploy/k8s sets httpGet probes on the same routes.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
# Every binary the images carry; the build fails if one of them is not built.
ARG FLEET_BINS="edge-api dispatcher callback-worker ws-gateway exec-worker nats-bridge fleetctl"
# Cargo's profile: `release` (the default), or `dev` for a quick build (cargo puts it in target/debug).
ARG CARGO_PROFILE=release
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit cache mounts), so a code change
# rebuilds Fleet's crates only. The binaries are copied out of the cached target dir into /out.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    set -eu; \
    set --; for b in $FLEET_BINS; do set -- "$@" --bin "$b"; done; \
    cargo build --locked --profile "$CARGO_PROFILE" "$@"; \
    case "$CARGO_PROFILE" in dev|test) dir=debug ;; bench) dir=release ;; *) dir=$CARGO_PROFILE ;; esac; \
    mkdir -p /out; \
    for b in $FLEET_BINS; do cp "target/$dir/$b" /out/; done; \
    rustc --edition 2021 -C opt-level=s -C strip=symbols -o /out/fleet-healthcheck deploy/docker/healthcheck.rs

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
LABEL org.opencontainers.image.source="https://github.com/fleet-orchestrator/fleet" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/fleet-healthcheck /usr/local/bin/fleet-healthcheck
USER 65532:65532

# ---------------------------------------------------------------------------------------------
# One target per binary. EXPOSE lists the ports the binary listens on by default; the
# HEALTHCHECK names the variable that moves its health port, so a changed address is followed.

FROM runtime AS dispatcher
COPY --from=builder /out/dispatcher /usr/local/bin/dispatcher
EXPOSE 9101
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fleet-healthcheck", "FLEET_ADMIN_ADDR", "9101", "/health/ready"]
ENTRYPOINT ["/usr/local/bin/dispatcher"]

FROM runtime AS callback-worker
COPY --from=builder /out/callback-worker /usr/local/bin/callback-worker
EXPOSE 9102
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fleet-healthcheck", "FLEET_ADMIN_ADDR", "9102", "/health/ready"]
ENTRYPOINT ["/usr/local/bin/callback-worker"]

FROM runtime AS ws-gateway
COPY --from=builder /out/ws-gateway /usr/local/bin/ws-gateway
EXPOSE 8002 9104
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fleet-healthcheck", "FLEET_ADMIN_ADDR", "9104", "/health/ready"]
ENTRYPOINT ["/usr/local/bin/ws-gateway"]

FROM runtime AS nats-bridge
COPY --from=builder /out/nats-bridge /usr/local/bin/nats-bridge
EXPOSE 9105
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fleet-healthcheck", "FLEET_ADMIN_ADDR", "9105", "/health/ready"]
ENTRYPOINT ["/usr/local/bin/nats-bridge"]

# The reference executor. Its `command` mode runs programs through `sh -c`, which this image
# lacks on purpose: for command mode build your own image FROM a base with a shell and your
# tools, and COPY --from=fleet/exec-worker /usr/local/bin/exec-worker into it (docs/deploy.md).
FROM runtime AS exec-worker
COPY --from=builder /out/exec-worker /usr/local/bin/exec-worker
EXPOSE 9106
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fleet-healthcheck", "FLEET_ADMIN_ADDR", "9106", "/health/ready"]
ENTRYPOINT ["/usr/local/bin/exec-worker"]

# The CLI (chat, dead letters): `docker run --rm fleet/fleetctl dlq list`. No port, no healthcheck.
FROM runtime AS fleetctl
COPY --from=builder /out/fleetctl /usr/local/bin/fleetctl
ENTRYPOINT ["/usr/local/bin/fleetctl"]

# edge-api serves /health/* on its REST port. Last, so a plain `docker build .` gives the front door.
FROM runtime AS edge-api
COPY --from=builder /out/edge-api /usr/local/bin/edge-api
EXPOSE 8001 50055
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/fleet-healthcheck", "FLEET_HTTP_ADDR", "8001", "/health/ready"]
ENTRYPOINT ["/usr/local/bin/edge-api"]
