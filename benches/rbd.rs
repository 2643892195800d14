//! Lodestone RBD benchmark: the controller's CSI calls (sequential p50,
//! bursts of concurrent calls) beside the same librbd work done directly
//! in-process, and the driver's memory. Run by `scripts/bench-rbd.sh`,
//! which starts a single-node Ceph cluster (`tests/ceph/cluster.sh`) and
//! passes its environment. A markdown report goes to stdout.

#[cfg(feature = "rbd")]
#[path = "rbd/imp.rs"]
mod imp;

fn main() {
    #[cfg(feature = "rbd")]
    imp::main();
    #[cfg(not(feature = "rbd"))]
    eprintln!("the RBD bench needs --features rbd (run scripts/bench-rbd.sh)");
}
