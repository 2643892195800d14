//! CSI conformance tests for Lodestone's LVM driver.
//!
//! Every test starts the real `lodestone` binary on a unix socket in a
//! temporary directory (see `common::Driver`) and talks CSI v1 to it.
//!
//! Two environments:
//! * the host (plain `cargo test --test conformance`): no device-mapper, so
//!   the volume groups do not exist. Identity, capability, validation and
//!   error-path tests run; tests that need volumes print
//!   "skipped: needs LODESTONE_TEST_LVM=1" and return.
//! * the QEMU guest with `LODESTONE_TEST_LVM=1`, after
//!   `tests/vm/lvm-fixture.sh setup` made VG `lodestone-thin` (thin pool
//!   `pool0`) and VG `lodestone-thick`. Run with `--test-threads=1`:
//!
//! ```text
//! cargo test --test conformance --no-run
//! tests/vm/run-in-guest.sh sh -c 'tests/vm/lvm-fixture.sh setup && \
//!     LODESTONE_TEST_LVM=1 target/debug/deps/conformance-<hash> --test-threads=1'
//! ```
//!
//! Under TCG every driver start costs seconds and every lvm command up to a
//! few, so the whole suite takes about 12 minutes in the guest; the host-side
//! tests are already covered by the host run, so in the guest it is enough
//! to run the backend tests and the leak check (about 6 minutes) by adding
//! the filters `_lvm:: zz_leaks` after `--test-threads=1`.
//!
//! `zz_leaks::no_lodestone_volumes_left_behind` sorts last and checks that
//! the suite deleted every logical volume it created. When a guest test
//! fails, its `Driver` deletes the volumes that test created on drop, so one
//! failure does not also fail the leak check.

#[path = "common/mod.rs"]
mod common;

#[path = "conformance/agent_errors.rs"]
mod agent_errors;
#[path = "conformance/agent_scope_lvm.rs"]
mod agent_scope_lvm;
#[path = "conformance/agent_tls.rs"]
mod agent_tls;
#[path = "conformance/cancel_lvm.rs"]
mod cancel_lvm;
#[path = "conformance/controller.rs"]
mod controller;
#[path = "conformance/controller_lvm.rs"]
mod controller_lvm;
#[path = "conformance/crash_lvm.rs"]
mod crash_lvm;
#[path = "conformance/ctl.rs"]
mod ctl;
#[path = "conformance/ctl_lvm.rs"]
mod ctl_lvm;
#[path = "conformance/identity.rs"]
mod identity;
#[path = "conformance/lifecycle.rs"]
mod lifecycle;
#[path = "conformance/metrics.rs"]
mod metrics;
#[path = "conformance/multinode_lvm.rs"]
mod multinode_lvm;
#[path = "conformance/node.rs"]
mod node;
#[path = "conformance/node_lvm.rs"]
mod node_lvm;
#[path = "conformance/resolver.rs"]
mod resolver;
#[path = "conformance/snapshot.rs"]
mod snapshot;
#[path = "conformance/snapshot_lvm.rs"]
mod snapshot_lvm;
#[path = "conformance/soak_lvm.rs"]
mod soak_lvm;
#[path = "conformance/validation.rs"]
mod validation;
#[path = "conformance/zz_leaks.rs"]
mod zz_leaks;
