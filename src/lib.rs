//! Lodestone: a Kubernetes CSI driver for local LVM and Ceph RBD.
//!
//! Layers, top to bottom: `driver` (the CSI gRPC services: validation, locks,
//! error mapping), `core` (backend-neutral logic: capacity, placement, node
//! mount work), and one module per backend (`lvm`). `runner` is the one way
//! to run an external program; `host` holds the mount and block-device
//! syscalls; `metrics` the Prometheus registry and its HTTP endpoint.

pub mod client;
pub mod config;
pub mod core;
pub mod ctl;
pub mod demo;
pub mod driver;
pub mod error;
pub mod failpoint;
pub mod host;
pub mod kube;
pub mod lvm;
pub mod metrics;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod runner;
pub mod server;
pub mod tls;

/// Generated CSI v1.12 messages and services.
pub mod csi {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// Generated messages and service of the internal controller-to-agent API.
pub mod agentpb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("lodestone.agent.v1");
}
