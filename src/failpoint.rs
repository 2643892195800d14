//! Fail points: named places at the step boundaries of multi-step
//! operations where a test can make the process die, as a `kill -9` at
//! exactly that instant would.
//!
//! `fail_point!("lvm.thin_clone.after_snapshot")` marks a boundary. In
//! builds with debug assertions (every test build; never the release
//! image), the environment variable `LODESTONE_FAILPOINTS` names the points
//! armed for this process, comma-separated; reaching an armed point prints
//! `lodestone: fail point NAME reached` to stderr and aborts the process at
//! once (no destructors, no flush, no reply: the caller sees the connection
//! drop). Release builds compile the macro to nothing.
//!
//! Names are `<backend>.<operation>.<step>`; a test arms one, runs the
//! operation, restarts the process without it, retries and checks that the
//! retry converges. `LODESTONE_FAILPOINTS=list` makes every point print its
//! name when reached instead of aborting, so a test can find the points an
//! operation crosses.

// Release builds compile every point to nothing: what follows is unused
// there.
#![cfg_attr(not(debug_assertions), allow(dead_code))]

use std::collections::HashSet;
use std::sync::OnceLock;

/// Environment variable naming the armed points.
pub(crate) const ENV: &str = "LODESTONE_FAILPOINTS";

fn armed() -> &'static (bool, HashSet<String>) {
    static ARMED: OnceLock<(bool, HashSet<String>)> = OnceLock::new();
    ARMED.get_or_init(|| {
        let raw = std::env::var(ENV).unwrap_or_default();
        let names: HashSet<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        (names.contains("list"), names)
    })
}

/// What `fail_point!` calls; see the module documentation.
pub(crate) fn hit(name: &str) {
    let (list, names) = armed();
    if *list {
        eprintln!("lodestone: fail point {name} crossed");
    } else if names.contains(name) {
        eprintln!("lodestone: fail point {name} reached");
        std::process::abort();
    }
}

/// Marks a step boundary (see [`crate::failpoint`]).
#[macro_export]
macro_rules! fail_point {
    ($name:expr) => {
        #[cfg(debug_assertions)]
        $crate::failpoint::hit($name);
    };
}
