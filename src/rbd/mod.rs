//! Ceph RBD backend (feature `rbd`): the controller (in-process librbd)
//! and, below it, the librados / librbd binding.
//!
//! * [`ffi`]: the librados / librbd C functions, loaded at run time by the
//!   controller only (`dlopen`; the binary does not link them).
//! * [`client`]: safe, blocking `Cluster` / `IoCtx` / `Image` with RAII.
//! * [`pool`]: async access for the controller: pooled connections, calls
//!   run under `spawn_blocking`, idle connections reaped.
//! * [`error`]: `RbdError` (typed errno) and its mapping to gRPC codes.
//! * [`params`]: StorageClass parameters, parsed into types.
//! * [`memory`]: keeps the heap librbd calls leave behind small.

pub mod client;
pub(crate) mod config;
pub(crate) mod controller;
pub mod error;
pub mod ffi;
pub(crate) mod ids;
pub(crate) mod memory;
pub(crate) mod node;
pub(crate) mod params;
pub mod pool;

pub use client::{
    Cluster, ConnectOptions, Credentials, Image, ImageInfo, ImageOptions, ImageSpec, IoCtx,
    LinkedImage, Parent, PoolStat, Secret, SnapInfo,
};
pub use error::{RbdError, RbdResult};
pub use pool::ConnectionPool;
