//! Agent mutations that finish whatever happens to their caller.
//!
//! A CSI deadline, a dropped connection or a cancelled agent RPC drops the
//! caller's future. A mutation that has started must still run to its own
//! end: its lvm command (which the runner never kills for that, see
//! [`crate::runner`]) and the update of the agent's in-memory LVM state
//! right after it, or that state would miss a change nobody refreshes. So
//! [`Detached`] runs every mutating call of the agent it wraps in a task of
//! its own and only awaits it; reads pass straight through.

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use crate::core::blockmap::BlockMap;
use crate::lvm::agent::{Agent, ClassCapacity, LvSpec, Pull};
use crate::lvm::error::{LvmError, Result};
use crate::lvm::inventory::{Stamp, Stamped, Updates, WatchRequest};
use crate::lvm::report::Lv;

/// An [`Agent`] whose mutations (create, remove, extend, resume) outlive
/// their caller. Other methods of the wrapped agent (its configuration and
/// such reads) are reached through `Deref`.
pub struct Detached<A>(Arc<A>);

impl<A> Detached<A> {
    pub fn new(agent: Arc<A>) -> Self {
        Detached(agent)
    }
}

impl<A> Deref for Detached<A> {
    type Target = A;

    fn deref(&self) -> &A {
        &self.0
    }
}

/// Runs `work` in a task of its own and waits for its result. Dropping the
/// returned future leaves the work running to its end.
pub(crate) async fn detach<T, F>(what: &'static str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: Future<Output = Result<T>> + Send + 'static,
{
    struct Waiting(&'static str, bool);
    impl Drop for Waiting {
        fn drop(&mut self) {
            if !self.1 {
                tracing::debug!(call = self.0, "the caller left; the call goes on");
            }
        }
    }
    let mut waiting = Waiting(what, false);
    let result = tokio::spawn(work).await;
    waiting.1 = true;
    result.map_err(|e| LvmError::Internal(format!("{what} failed: {e}")))?
}

#[tonic::async_trait]
impl<A: Agent> Agent for Detached<A> {
    fn node(&self) -> &str {
        self.0.node()
    }

    async fn create(&self, spec: &LvSpec) -> Result<Stamped<Lv>> {
        let (agent, spec) = (self.0.clone(), spec.clone());
        detach("create", async move { agent.create(&spec).await }).await
    }

    async fn remove(&self, class: &str, lv: &str) -> Result<Stamp> {
        let (agent, class, lv) = (self.0.clone(), class.to_string(), lv.to_string());
        detach("remove", async move { agent.remove(&class, &lv).await }).await
    }

    async fn extend(&self, class: &str, lv: &str, size: u64) -> Result<Stamped<Lv>> {
        let (agent, class, lv) = (self.0.clone(), class.to_string(), lv.to_string());
        detach(
            "extend",
            async move { agent.extend(&class, &lv, size).await },
        )
        .await
    }

    async fn find(&self, class: &str, lv: &str) -> Result<Option<Lv>> {
        self.0.find(class, lv).await
    }

    async fn list(&self) -> Result<Vec<(String, Lv)>> {
        self.0.list().await
    }

    async fn capacity(&self, class: &str) -> Result<ClassCapacity> {
        self.0.capacity(class).await
    }

    async fn resume(
        &self,
        class: &str,
        lv: &str,
        pull: Option<&Pull>,
    ) -> Result<Stamped<Option<Lv>>> {
        let (agent, class, lv) = (self.0.clone(), class.to_string(), lv.to_string());
        let pull = pull.cloned();
        detach("resume", async move {
            agent.resume(&class, &lv, pull.as_ref()).await
        })
        .await
    }

    async fn copy_progress(&self, class: &str, lv: &str) -> Option<(String, bool)> {
        self.0.copy_progress(class, lv).await
    }

    async fn watch(&self, request: WatchRequest) -> Result<Updates> {
        self.0.watch(request).await
    }

    /// A read; the agent detaches its own reserve-read-release of a thin
    /// pool's metadata snapshot (and stops a thick comparison when the
    /// caller leaves).
    async fn block_map(&self, class: &str, lv: &str, base: Option<&str>) -> Result<BlockMap> {
        self.0.block_map(class, lv, base).await
    }

    /// Memory only: nothing to detach.
    async fn grant(&self, class: &str, lv: &str, node: &str) -> Result<()> {
        self.0.grant(class, lv, node).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;

    /// Mutations sleep, then record what they did (as the real agent runs
    /// lvm, then updates its state); reads answer from the record.
    #[derive(Default)]
    struct Fake {
        done: Mutex<Vec<String>>,
    }

    impl Fake {
        async fn mutate(&self, what: String) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.done.lock().unwrap().push(what);
        }

        fn lv(name: &str) -> Lv {
            Lv {
                vg: "vg".into(),
                name: name.into(),
                size: 4 << 20,
                attr: "-wi-a-----".into(),
                tags: Vec::new(),
                pool: None,
                data_percent: None,
                metadata_percent: None,
                when_full: String::new(),
                zeroing: false,
                created: None,
            }
        }
    }

    #[tonic::async_trait]
    impl Agent for Fake {
        fn node(&self) -> &str {
            "n1"
        }
        async fn create(&self, spec: &LvSpec) -> Result<Stamped<Lv>> {
            self.mutate(format!("create {}", spec.name)).await;
            Ok(stamped(Self::lv(&spec.name)))
        }
        async fn remove(&self, _: &str, lv: &str) -> Result<Stamp> {
            self.mutate(format!("remove {lv}")).await;
            Ok(Stamp::default())
        }
        async fn extend(&self, _: &str, lv: &str, size: u64) -> Result<Stamped<Lv>> {
            self.mutate(format!("extend {lv} {size}")).await;
            Ok(stamped(Self::lv(lv)))
        }
        async fn find(&self, _: &str, lv: &str) -> Result<Option<Lv>> {
            let done = self.done.lock().unwrap();
            Ok(done
                .iter()
                .any(|d| *d == format!("create {lv}"))
                .then(|| Self::lv(lv)))
        }
        async fn list(&self) -> Result<Vec<(String, Lv)>> {
            Ok(Vec::new())
        }
        async fn capacity(&self, _: &str) -> Result<ClassCapacity> {
            Err(LvmError::Unavailable("none".into()))
        }
        async fn resume(&self, _: &str, lv: &str, _: Option<&Pull>) -> Result<Stamped<Option<Lv>>> {
            self.mutate(format!("resume {lv}")).await;
            Ok(stamped(None))
        }
        async fn copy_progress(&self, _: &str, _: &str) -> Option<(String, bool)> {
            None
        }
        async fn watch(&self, _: WatchRequest) -> Result<Updates> {
            Err(LvmError::Unavailable("none".into()))
        }
        async fn block_map(&self, _: &str, _: &str, _: Option<&str>) -> Result<BlockMap> {
            Err(LvmError::Unavailable("none".into()))
        }
    }

    fn stamped<T>(value: T) -> Stamped<T> {
        Stamped {
            value,
            stamp: Stamp::default(),
        }
    }

    fn spec(name: &str) -> LvSpec {
        LvSpec {
            class: "c".into(),
            name: name.into(),
            size: 4 << 20,
            tags: Vec::new(),
            origin: None,
            pull: None,
            read_only: false,
        }
    }

    /// Drops `call` after 100 ms, as a CSI deadline would.
    async fn give_up<T>(call: impl Future<Output = T>) {
        let r = tokio::time::timeout(Duration::from_millis(100), call).await;
        assert!(r.is_err(), "the call ended within 100 ms");
    }

    #[tokio::test]
    async fn mutations_finish_after_the_caller_left() {
        let fake = Arc::new(Fake::default());
        let agent = Detached::new(fake.clone());
        let spec = spec("a");
        tokio::join!(
            give_up(agent.create(&spec)),
            give_up(agent.remove("c", "b")),
            give_up(agent.extend("c", "a", 8 << 20)),
            give_up(agent.resume("c", "a", None)),
        );
        assert!(fake.done.lock().unwrap().is_empty());
        tokio::time::sleep(Duration::from_millis(600)).await;
        let mut done = fake.done.lock().unwrap().clone();
        done.sort();
        assert_eq!(
            done,
            ["create a", "extend a 8388608", "remove b", "resume a"]
        );
        // The record the create made is what later reads see.
        assert!(agent.find("c", "a").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn the_undecorated_agent_loses_the_mutation() {
        // What the decorator is for: without it the dropped call never
        // reaches its record.
        let fake = Arc::new(Fake::default());
        give_up(fake.create(&spec("a"))).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(fake.done.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_caller_that_stays_gets_the_result() {
        let agent = Detached::new(Arc::new(Fake::default()));
        let lv = agent.create(&spec("a")).await.unwrap().value;
        assert_eq!(lv.name, "a");
        assert_eq!(agent.node(), "n1");
        assert!(agent.find("c", "a").await.unwrap().is_some());
    }
}
