//! Backend-neutral core: identity rules, request validation, capacity math,
//! placement, operation locks, and the node-side filesystem work every backend shares.

pub mod backend;
pub mod capacity;
pub mod ids;
pub mod locks;
pub mod node;
pub mod placement;
pub mod request;
