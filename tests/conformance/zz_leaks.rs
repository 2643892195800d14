//! Runs last (tests run in name order with `--test-threads=1`): the suite
//! must leave nothing behind.

use crate::common::*;

/// Every volume a test created was deleted again: no logical volume tagged
/// by Lodestone is left in the fixture's volume groups, and nothing of
/// theirs is still mounted.
#[test]
fn no_lodestone_volumes_left_behind() {
    if skip_without_lvm() {
        return;
    }
    let left = lodestone_lvs();
    assert!(
        left.is_empty(),
        "logical volumes left behind by the suite: {left:#?}"
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounted: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            l.contains(THIN_VG)
                || l.contains(THICK_VG)
                || l.contains(NODE2_VG)
                || l.contains("lodestone-ct-")
        })
        .collect();
    assert!(mounted.is_empty(), "mounts left behind: {mounted:#?}");
}
