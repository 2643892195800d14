# syntax=docker/dockerfile:1
#
# Lodestone CSI driver image: one binary for both drivers (lvm.lodestone.dev
# and rbd.lodestone.dev), built with the `rbd` feature (its controller loads
# librbd/librados at run time; the node plugin never does).
#
#   docker build -t lodestone:0.1.0 .
#
# Two stages: the build stage has Rust and protoc; the
# runtime stage has the binary and exactly the programs and libraries the
# driver uses at run time (tests/deploy/test_dockerfile.py checks this list
# against the programs the Rust sources run).

ARG DEBIAN_RELEASE=bookworm

FROM rust:1.95-${DEBIAN_RELEASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
# Cargo.toml names these targets explicitly; the build only needs them to exist.
COPY benches benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --features rbd --bin lodestone \
 && install -D -m 0755 target/release/lodestone /out/lodestone

FROM debian:${DEBIAN_RELEASE}-slim
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="lodestone" \
      org.opencontainers.image.description="Kubernetes CSI driver for local LVM and Ceph RBD volumes" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
# What each package is for (program -> package):
#   lvm (and thin_check/thin_repair, which lvm runs for thin pools)
#                         lvm2, thin-provisioning-tools
#   thin_dump, thin_delta (block maps of thin snapshots)
#                         thin-provisioning-tools
#   dmsetup (a thin pool's metadata snapshot)  dmsetup
#   mkfs.ext4, resize2fs  e2fsprogs
#   mkfs.xfs, xfs_growfs  xfsprogs
#   mkfs.btrfs, btrfs     btrfs-progs
#   blkid                 util-linux
#   losetup (`lodestone demo` only)  mount
#   rbd (krbd map/unmap)  ceph-common
#   modprobe (rbd loads the kernel module when it is missing)
#                         kmod
#   (rbd-nbd is not offered: its daemon would die with a restarted plugin)
#   librados2, librbd1    libraries the rbd controller loads at run time
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      lvm2 thin-provisioning-tools dmsetup \
      e2fsprogs xfsprogs btrfs-progs \
      util-linux mount \
      ceph-common kmod \
      librados2 librbd1 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
# LVM without udev, sharing the host's lock, run, backup and archive
# directories (see the file for each setting).
COPY deploy/image/lvm.conf /etc/lvm/lvm.conf
COPY --from=build /out/lodestone /usr/local/bin/lodestone
# The node plugin needs root (mounts, device nodes, LVM); the controller
# Deployment may run it as any user (see deploy/).
ENTRYPOINT ["/usr/local/bin/lodestone"]
