//! Background work that repeats for as long as its owner lives.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs `work` on `owner` now and then every `every`, until the owner is
/// dropped (the task holds only a weak reference between runs).
pub(crate) fn spawn_every<T, F, Fut>(owner: &Arc<T>, every: Duration, work: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let owner = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let Some(owner) = owner.upgrade() else { return };
            work(owner).await;
        }
    });
}
