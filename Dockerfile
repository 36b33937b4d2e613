# Lapse in a small, non-root image: a release build of the `lapse` binary on
# distroless (glibc, CA certificates, no shell, no package manager), user 65532.
#
#   docker build -t lapse .
#   docker run --rm -p 7800:7800 -v $PWD/lapse.toml:/etc/lapse/lapse.toml:ro lapse
#
# examples/replicas/compose.yaml runs two replicas on PostgreSQL behind nginx.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The AVX-512 IFMA backend for Ed25519 (chosen at run time; README, "Gates").
COPY .cargo .cargo
COPY crates crates
COPY examples examples
RUN cargo build --release --locked -p lapse-cli \
 && strip target/release/lapse \
 && install -D target/release/lapse /out/lapse

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lapse /usr/local/bin/lapse
USER nonroot:nonroot
EXPOSE 7800
ENTRYPOINT ["/usr/local/bin/lapse"]
CMD ["serve", "--config", "/etc/lapse/lapse.toml"]
