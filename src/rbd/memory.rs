//! Keeping the RBD controller's heap small (glibc only).
//!
//! librados and librbd allocate from whichever thread runs a call, and the
//! controller runs calls on short-lived blocking threads: left alone, glibc
//! gives those threads arenas of their own and keeps what they freed, so a
//! burst of calls leaves the process several MiB larger for good. Two
//! arenas are plenty for a controller that runs at most eight calls at once,
//! and once the calls stop, freed pages go back to the kernel.

/// Caps glibc's malloc arenas at two. Call early, before threads allocate.
pub(crate) fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

/// Returns free heap pages of every arena to the kernel. Blocks for about
/// a millisecond per few MiB of heap: call it from a blocking thread.
pub(crate) fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes the allocator's own locks.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
