//! What the node does to its host: block device ioctls, mounts, filesystems.

pub(crate) mod blockdev;
pub(crate) mod fs;
pub(crate) mod mount;
