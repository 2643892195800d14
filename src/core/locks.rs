//! In-flight operation guards: one operation per volume (or request name) at
//! a time. A conflicting call is refused with ABORTED at once; nothing waits.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::error::Error;

#[derive(Debug, Default, Clone)]
pub struct OpLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Releases its keys when dropped.
#[derive(Debug)]
pub struct OpGuard {
    held: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl OpLocks {
    /// Takes every key or none of them.
    pub fn try_lock<I, S>(&self, keys: I) -> Result<OpGuard, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let keys: Vec<String> = keys.into_iter().map(Into::into).collect();
        let mut held = self.held.lock().expect("lock table poisoned");
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(Error::Aborted(format!(
                "an operation on {busy} is already in progress; retry later"
            )));
        }
        for k in &keys {
            held.insert(k.clone());
        }
        Ok(OpGuard {
            held: self.held.clone(),
            keys,
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("lock table poisoned");
        for k in &self.keys {
            held.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflicting_keys_abort_and_release_on_drop() {
        let locks = OpLocks::default();
        let g = locks.try_lock(["vol-a", "name-a"]).unwrap();
        let err = locks.try_lock(["name-a"]).unwrap_err();
        assert!(matches!(err, Error::Aborted(_)));
        // All-or-nothing: the failed attempt took nothing.
        assert!(locks.try_lock(["vol-b"]).is_ok());
        drop(g);
        assert!(locks.try_lock(["vol-a", "name-a"]).is_ok());
    }
}
