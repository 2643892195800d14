//! In-flight operation guards: one operation per volume (or request name) at
//! a time. A conflicting call is refused with ABORTED at once; nothing waits.
//!
//! A key is held either exclusively (the operation changes what the key
//! names: create under a name, delete, expand) or shared (the operation only
//! reads it: a clone or restore copying its source). Shared holders do not
//! exclude each other, so many clones of one source run at once, but none of
//! them runs beside a delete or expansion of that source.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Error;

/// Holders of a key: `Exclusive`, or the number of shared holders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Exclusive,
    Shared(usize),
}

#[derive(Debug, Default, Clone)]
pub struct OpLocks {
    held: Arc<Mutex<HashMap<String, Held>>>,
}

/// Releases its keys when dropped.
#[derive(Debug)]
pub struct OpGuard {
    held: Arc<Mutex<HashMap<String, Held>>>,
    exclusive: Vec<String>,
    shared: Vec<String>,
}

fn busy(key: &str) -> Error {
    Error::Aborted(format!(
        "an operation on {key} is already in progress; retry later"
    ))
}

impl OpLocks {
    /// Takes every key exclusively, or none of them.
    pub fn try_lock<I, S>(&self, keys: I) -> Result<OpGuard, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.try_lock_shared(keys, std::iter::empty::<String>())
    }

    /// Takes `exclusive` keys exclusively and `shared` keys shared, all or
    /// nothing.
    pub fn try_lock_shared<I, S, J, T>(&self, exclusive: I, shared: J) -> Result<OpGuard, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        J: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let exclusive: Vec<String> = exclusive.into_iter().map(Into::into).collect();
        let shared: Vec<String> = shared.into_iter().map(Into::into).collect();
        let mut held = self.held.lock().expect("lock table poisoned");
        if let Some(k) = exclusive.iter().find(|k| held.contains_key(*k)) {
            return Err(busy(k));
        }
        if let Some(k) = shared
            .iter()
            .find(|k| held.get(*k) == Some(&Held::Exclusive) || exclusive.contains(k))
        {
            return Err(busy(k));
        }
        for k in &exclusive {
            held.insert(k.clone(), Held::Exclusive);
        }
        for k in &shared {
            let n = match held.get(k) {
                Some(Held::Shared(n)) => n + 1,
                _ => 1,
            };
            held.insert(k.clone(), Held::Shared(n));
        }
        Ok(OpGuard {
            held: self.held.clone(),
            exclusive,
            shared,
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("lock table poisoned");
        for k in &self.exclusive {
            held.remove(k);
        }
        for k in &self.shared {
            match held.get_mut(k) {
                Some(Held::Shared(n)) if *n > 1 => *n -= 1,
                _ => {
                    held.remove(k);
                }
            }
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

    #[test]
    fn shared_holders_exclude_only_exclusive_ones() {
        let locks = OpLocks::default();
        let a = locks.try_lock_shared(["name-a"], ["src"]).unwrap();
        let b = locks.try_lock_shared(["name-b"], ["src"]).unwrap();
        assert!(matches!(locks.try_lock(["src"]), Err(Error::Aborted(_))));
        drop(a);
        assert!(matches!(locks.try_lock(["src"]), Err(Error::Aborted(_))));
        drop(b);
        let del = locks.try_lock(["src"]).unwrap();
        assert!(matches!(
            locks.try_lock_shared(["name-c"], ["src"]),
            Err(Error::Aborted(_))
        ));
        // All-or-nothing: the failed attempt did not take name-c.
        assert!(locks.try_lock(["name-c"]).is_ok());
        drop(del);
        assert!(locks.try_lock_shared(["name-c"], ["src"]).is_ok());
    }
}
