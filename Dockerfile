# syntax=docker/dockerfile:1
# The `twophase` binary (every worker and ops command) in a small Debian image.
#
#   docker build -t twophase .
#   docker run --rm twophase --help
#
# rdkafka-sys compiles librdkafka from source with zlib and OpenSSL (TLS, and SASL PLAIN,
# SCRAM and OAUTHBEARER over it), which takes a C and C++ toolchain, make, pkg-config and the
# zlib and OpenSSL headers; SQLite is compiled in as well. At run time the binary links libc,
# libm, libgcc_s and libz, all in the slim base image, and libssl3, installed with the CA
# certificates a TLS connection checks the brokers against.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep the registry and compiled dependencies between builds; the binary is copied
# out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p twophase \
    && cp target/release/twophase /usr/local/bin/twophase

# The same Debian release as the builder, so that the binary finds the glibc it was linked with.
FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin twophase
COPY --from=builder /usr/local/bin/twophase /usr/local/bin/twophase
USER twophase
# The workers' default metrics ports (coordinator, account, second account, risk, audit,
# reconciler); only the one of the worker that runs is used.
EXPOSE 9101 9102 9103 9104 9105 9106
ENTRYPOINT ["twophase"]
CMD ["--help"]
