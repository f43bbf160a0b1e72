# syntax=docker/dockerfile:1

# Build stage: the full Rust toolchain plus a C compiler for the vendored Lua.
FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crate registry and build artifacts across builds;
# the binary is copied out because target/ lives only in the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/agent-block /usr/local/bin/agent-block

# Runtime stage: glibc to match the builder, nothing else.
FROM debian:bookworm-slim
# CA roots for tls:// NATS URLs and OTLP over HTTPS, taken from the builder
# so this stage needs no package manager run.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /usr/local/bin/agent-block /usr/local/bin/agent-block
# Scripts are mounted here (compose volume, Kubernetes ConfigMap).
WORKDIR /scripts
# Metrics and probes must be reachable from outside the container.
ENV AGENT_BLOCK_METRICS_ADDR=0.0.0.0:9090
EXPOSE 9090
# Numeric, so Kubernetes runAsNonRoot can verify it without a passwd entry.
USER 10001:10001
# The worker drains on SIGTERM: stop taking messages, finish within --grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/agent-block"]
CMD ["run", "/scripts/app.lua"]
