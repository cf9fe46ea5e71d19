# One image for every role: `haul coordinator`, `haul worker`, `haul loader`, and the
# CLI (`haul submit`, `haul run`, ...). Build:
#   buildah bud -t haul .          (or: docker build -t haul .)
# scripts/build-image.sh builds it where base images cannot be pulled, from local ones.
#
# The runtime image is distroless: glibc, CA certificates, no shell, user 65532
# (nonroot). haul speaks TLS with rustls and needs nothing else from the system.

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# the revision `haul --version` names (.git stays out of the build context)
ARG HAUL_GIT_REV=unknown
ENV HAUL_GIT_REV=${HAUL_GIT_REV}
# cargo's registry and target folder persist between builds: a rebuild compiles only
# what changed. The release profile's line tables are stripped from the image's binary
# (symbols stay, for backtraces with function names).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin haul \
    && cp target/release/haul /haul \
    && strip --strip-debug /haul

FROM ${RUNTIME_IMAGE} AS runtime
COPY --from=build /haul /usr/local/bin/haul
USER 65532:65532
# coordinator gRPC, loader Flight, metrics and health
EXPOSE 50051 50052 9090
ENTRYPOINT ["/usr/local/bin/haul"]
CMD ["--help"]
