//! The LVM backend: the node agent (the only code that runs LVM), the
//! controller logic that places and manages volumes through agents, and the
//! node logic that finds a volume's device.

pub mod agent;
pub(crate) mod blockmap;
pub(crate) mod channel;
pub(crate) mod codec;
pub(crate) mod controller;
pub(crate) mod copy;
pub(crate) mod detached;
pub mod error;
pub mod ids;
pub(crate) mod index;
pub mod inventory;
pub(crate) mod node;
pub(crate) mod params;
pub mod pull;
pub mod remote;
pub(crate) mod report;
pub(crate) mod resolver;
pub mod rpc;
pub mod wire;
