# etcd-squeeze container image: a multi-stage build, then a minimal runtime holding only the
# binary, the C libraries it links (glibc, libm, libgcc_s) and the example config; it runs as a
# non-root user and needs no shell.
#
#   docker build -t etcd-squeeze:0.1.0 .          # where a registry is reachable (rust, distroless)
#   scripts/image                                  # here: no registry; see that script
#
# scripts/image passes a RUST_IMAGE that already holds /out/etcd-squeeze (built on the host) and a
# RUNTIME_IMAGE made from the host's libraries with `docker import`.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN if [ -x /out/etcd-squeeze ]; then echo "using the prebuilt /out/etcd-squeeze"; \
    else cargo build --release --locked --bin etcd-squeeze && mkdir -p /out && cp target/release/etcd-squeeze /out/; fi

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /out/etcd-squeeze /usr/local/bin/etcd-squeeze
COPY config/etcd-squeeze.toml /etc/etcd-squeeze/etcd-squeeze.toml
USER 65532:65532
# The etcd API (server.listen) and /metrics, /healthz, /readyz (metrics.listen); both on loopback
# by default, for a sidecar on the host network next to kube-apiserver.
EXPOSE 12379 9379
ENTRYPOINT ["/usr/local/bin/etcd-squeeze"]
CMD ["serve", "--config", "/etc/etcd-squeeze/etcd-squeeze.toml"]
