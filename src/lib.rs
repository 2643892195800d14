//! Lodestone: a Kubernetes CSI driver for local LVM and Ceph RBD.
//!
//! Layers, top to bottom (a call goes down; imports only point down, which
//! `scripts/check-layers.sh` checks):
//!
//! - `ctl` (a CSI client for operators) and `demo`, on top: they talk to
//!   the driver over its socket (`client`) or start it, and nothing below
//!   imports them. `main` parses the command line and runs one of them or
//!   the server.
//! - `server`: assembles the services of a process (by `--driver` and
//!   `--mode`, from `config`) and serves them.
//! - `driver`: the CSI gRPC services (validation, locks, error mapping),
//!   backend-neutral.
//! - `core`: backend-neutral logic (capacity, placement, node mount work)
//!   and the backend traits.
//! - The backends, one module each, implementing `core`'s traits: `lvm`
//!   (with its node agent API over mutual TLS, `tls`, and agent discovery
//!   through `kube`) and `rbd` (librbd in the controller, krbd on nodes;
//!   the `rbd` feature).
//! - `host` (mount and block-device syscalls) and `runner` (the one way to
//!   run an external program), with `error` and `failpoint`.
//!
//! `metrics` holds the Prometheus registry and its HTTP endpoint.
//!
//! Only what `main`, the integration tests and the benchmarks use is
//! public; everything else is `pub(crate)`.

#![warn(unreachable_pub)]
pub mod client;
pub mod config;
pub(crate) mod core;
pub mod ctl;
pub mod demo;
pub(crate) mod driver;
pub mod error;
pub(crate) mod failpoint;
pub(crate) mod host;
pub(crate) mod kube;
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
