//! What the node does to its host: block device ioctls, mounts, filesystems.

pub mod blockdev;
pub mod fs;
pub mod mount;
