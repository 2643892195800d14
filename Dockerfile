# Lodestone CSI driver image.
# Build: docker build -t lodestone:dev .
# The runtime stage has exactly the programs the driver runs (see
# src/runner.rs callers): lvm2 + thin-provisioning-tools for LVM, e2fsprogs,
# xfsprogs and btrfs-progs for mkfs/resize, util-linux for blkid and losetup.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
RUN cargo build --release --locked --bin lodestone

FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="lodestone" \
      org.opencontainers.image.description="Kubernetes CSI driver for local LVM and Ceph RBD" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      lvm2 thin-provisioning-tools e2fsprogs xfsprogs btrfs-progs util-linux \
 && rm -rf /var/lib/apt/lists/* \
 # No udev in the container: LVM creates device nodes itself and never waits
 # for udev (the driver also passes these settings with --config).
 && sed -i -e 's/^\(\s*\)# udev_sync = 1/\1udev_sync = 0/' \
           -e 's/^\(\s*\)# udev_rules = 1/\1udev_rules = 0/' /etc/lvm/lvm.conf
COPY --from=build /src/target/release/lodestone /usr/local/bin/lodestone
ENTRYPOINT ["/usr/local/bin/lodestone"]
