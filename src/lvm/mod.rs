//! The LVM backend: the node agent (the only code that runs LVM), the
//! controller logic that places and manages volumes through agents, and the
//! node logic that finds a volume's device.

pub mod agent;
pub mod controller;
pub mod copy;
pub mod detached;
pub mod error;
pub mod ids;
pub mod node;
pub mod params;
pub mod remote;
pub mod report;
pub mod resolver;
pub mod rpc;
