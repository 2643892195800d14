//! Backend-neutral core: identity rules, request validation, capacity math,
//! placement, operation locks, and the node-side filesystem work every backend shares.

pub(crate) mod backend;
pub(crate) mod blockmap;
pub(crate) mod capacity;
pub(crate) mod ids;
pub(crate) mod locks;
pub(crate) mod node;
pub(crate) mod periodic;
pub(crate) mod placement;
pub(crate) mod request;
