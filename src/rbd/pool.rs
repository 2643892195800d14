//! A pool of cluster connections for async callers: one [`Cluster`] per
//! (monitors, user), I/O contexts cached per pool, every blocking librados /
//! librbd call run under `tokio::task::spawn_blocking`, and an idle reaper
//! that shuts down connections unused for a while.
//!
//! A connection is reused only by callers presenting the same key it was
//! made with (compared through a keyed hash held in memory, never the key
//! itself): a request with a wrong key never rides on another request's
//! authenticated connection. A different key (rotation) makes a new
//! connection, which replaces the old one once it has authenticated.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::client::{
    Cluster, ConnectOptions, Credentials, ImageInfo, ImageOptions, ImageSpec, IoCtx, PoolStat,
};
use super::error::{RbdError, RbdResult};

/// What a connection is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub mon_host: String,
    pub user: String,
}

struct Entry {
    cluster: Arc<Cluster>,
    fingerprint: u64,
    last_used: Instant,
    ioctxs: HashMap<String, Arc<IoCtx>>,
}

impl Entry {
    /// Someone outside the pool holds the cluster or one of its contexts.
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.cluster) > 1 + self.ioctxs.len()
            || self.ioctxs.values().any(|io| Arc::strong_count(io) > 1)
    }
}

struct Shared {
    conns: Mutex<HashMap<ConnKey, Entry>>,
    /// One lock per key: concurrent first calls make one connection, and a
    /// slow or unreachable cluster does not hold up connects to others.
    connecting: Mutex<HashMap<ConnKey, Arc<tokio::sync::Mutex<()>>>>,
    hasher: RandomState,
    options: ConnectOptions,
    idle: Duration,
    /// Bounds the librbd calls in flight, hence the blocking threads (each
    /// costs memory: a stack and a malloc arena) in a burst of requests.
    /// The blocking task holds its permit until it returns, so a caller
    /// that gives up (a cancelled request) does not free a slot early.
    calls: Arc<tokio::sync::Semaphore>,
    /// Bounds background flattens (long: proportional to the data) apart
    /// from `calls`, so flattens never starve controller calls.
    flattens: Arc<tokio::sync::Semaphore>,
    /// Calls made since the heap was last trimmed.
    calls_since_trim: AtomicUsize,
}

/// How often the pool checks whether calls stopped (then trims the heap).
const TRIM_CHECK: Duration = Duration::from_secs(1);

/// librbd calls in flight at once; more wait for a slot.
pub const MAX_CALLS: usize = 8;

/// Background flattens in flight at once (beside [`MAX_CALLS`]).
pub const MAX_FLATTENS: usize = 2;

/// Runs `f` on a blocking thread once `slots` grants a permit; the permit
/// moves into the blocking task and is released when `f` returns, even if
/// the caller stopped waiting (its future dropped) long before.
pub async fn run_bounded<R, F>(slots: &Arc<tokio::sync::Semaphore>, f: F) -> RbdResult<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let asked = Instant::now();
    let permit = Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("never closed");
    let granted = Instant::now();
    let (out, started, done) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = f();
        drop(permit);
        (out, started, Instant::now())
    })
    .await
    .map_err(join_error)?;
    // Where a call's time went, apart from librbd's own work
    // (RUST_LOG=lodestone::rbd::timing=trace).
    tracing::trace!(
        target: "lodestone::rbd::timing",
        slot_wait_us = (granted - asked).as_micros() as u64,
        to_thread_us = (started - granted).as_micros() as u64,
        call_us = (done - started).as_micros() as u64,
        back_us = done.elapsed().as_micros() as u64,
        "librbd call"
    );
    Ok(out)
}

/// Connections to Ceph clusters, shared by async callers. Create it inside a
/// Tokio runtime (it spawns the reaper).
pub struct ConnectionPool {
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
    trimmer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("connections", &self.len())
            .field("idle", &self.shared.idle)
            .finish()
    }
}

fn join_error(e: tokio::task::JoinError) -> RbdError {
    RbdError::Other {
        errno: super::error::ECANCELED,
        what: format!("blocking librbd task failed: {e}"),
    }
}

impl ConnectionPool {
    /// A pool whose connections are shut down after `idle` without use
    /// (checked every `idle / 2`, at least every second... at most every
    /// 60 s).
    pub fn new(options: ConnectOptions, idle: Duration) -> ConnectionPool {
        let shared = Arc::new(Shared {
            conns: Mutex::new(HashMap::new()),
            connecting: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
            options,
            idle,
            calls: Arc::new(tokio::sync::Semaphore::new(MAX_CALLS)),
            flattens: Arc::new(tokio::sync::Semaphore::new(MAX_FLATTENS)),
            calls_since_trim: AtomicUsize::new(0),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        let period = (idle / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let reaper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { break };
                let n = reap(&shared, Some(shared.idle)).await;
                if n > 0 {
                    tracing::debug!(closed = n, "rbd: shut down idle ceph connections");
                }
            }
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        let trimmer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(TRIM_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { break };
                // Calls ran, and none is running now: the burst is over.
                let idle = shared.calls.available_permits() == MAX_CALLS
                    && shared.flattens.available_permits() == MAX_FLATTENS;
                if idle && shared.calls_since_trim.swap(0, Ordering::Relaxed) > 0 {
                    drop(shared);
                    let _ = tokio::task::spawn_blocking(super::memory::release_free_heap).await;
                }
            }
        });
        ConnectionPool {
            shared,
            reaper,
            trimmer,
        }
    }

    /// librbd calls running now (blocking tasks holding a call slot).
    pub fn calls_in_flight(&self) -> usize {
        MAX_CALLS - self.shared.calls.available_permits()
    }

    /// Background flattens running now.
    pub fn flattens_in_flight(&self) -> usize {
        MAX_FLATTENS - self.shared.flattens.available_permits()
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.shared.conns.lock().expect("rbd pool lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shuts down connections idle for longer than the pool's idle time now
    /// (the reaper does this on its own); returns how many.
    pub async fn reap_idle(&self) -> usize {
        reap(&self.shared, Some(self.shared.idle)).await
    }

    /// Shuts down every connection not in use; returns how many.
    pub async fn close_all(&self) -> usize {
        reap(&self.shared, None).await
    }

    /// A cached I/O context on `pool`, connecting first if needed.
    /// The connection for these credentials (made on first use).
    async fn connection(
        &self,
        creds: &Credentials,
        key: &ConnKey,
        fingerprint: u64,
    ) -> RbdResult<Arc<Cluster>> {
        let lock = {
            let mut locks = self.shared.connecting.lock().expect("rbd pool lock");
            Arc::clone(locks.entry(key.clone()).or_default())
        };
        let _connecting = lock.lock().await;
        // Someone may have connected while we waited.
        let cluster = match self.cached_cluster(key, fingerprint) {
            Some(c) => c,
            None => {
                let creds2 = Credentials {
                    mon_host: creds.mon_host.clone(),
                    user: creds.user.clone(),
                    key: creds.key.duplicate(),
                };
                let options = self.shared.options.clone();
                let cluster = tokio::task::spawn_blocking(move || {
                    Cluster::connect(&creds2, &options).map(Arc::new)
                })
                .await
                .map_err(join_error)??;
                let old = {
                    let mut conns = self.shared.conns.lock().expect("rbd pool lock");
                    conns.insert(
                        key.clone(),
                        Entry {
                            cluster: Arc::clone(&cluster),
                            fingerprint,
                            last_used: Instant::now(),
                            ioctxs: HashMap::new(),
                        },
                    )
                };
                if let Some(old) = old {
                    // a key change: the old connection goes (shutdown blocks)
                    drop_blocking(vec![old]).await;
                }
                cluster
            }
        };
        drop(_connecting);
        Ok(cluster)
    }

    pub async fn ioctx(&self, creds: &Credentials, pool: &str) -> RbdResult<Arc<IoCtx>> {
        let key = ConnKey {
            mon_host: creds.mon_host.clone(),
            user: creds.user.clone(),
        };
        let fingerprint = self.shared.hasher.hash_one(creds.key.expose());
        if let Some(io) = self.cached(&key, fingerprint, pool) {
            return Ok(io);
        }
        let cluster = self.connection(creds, &key, fingerprint).await?;
        let c = Arc::clone(&cluster);
        let pool_name = pool.to_string();
        let io = tokio::task::spawn_blocking(move || c.ioctx(&pool_name).map(Arc::new))
            .await
            .map_err(join_error)??;
        let mut conns = self.shared.conns.lock().expect("rbd pool lock");
        match conns.get_mut(&key) {
            Some(e) if Arc::ptr_eq(&e.cluster, &cluster) => {
                e.last_used = Instant::now();
                Ok(Arc::clone(e.ioctxs.entry(pool.to_string()).or_insert(io)))
            }
            // replaced or reaped meanwhile: hand out ours uncached
            _ => Ok(io),
        }
    }

    fn cached(&self, key: &ConnKey, fingerprint: u64, pool: &str) -> Option<Arc<IoCtx>> {
        let mut conns = self.shared.conns.lock().expect("rbd pool lock");
        let e = conns
            .get_mut(key)
            .filter(|e| e.fingerprint == fingerprint)?;
        e.last_used = Instant::now();
        e.ioctxs.get(pool).cloned()
    }

    fn cached_cluster(&self, key: &ConnKey, fingerprint: u64) -> Option<Arc<Cluster>> {
        let mut conns = self.shared.conns.lock().expect("rbd pool lock");
        let e = conns
            .get_mut(key)
            .filter(|e| e.fingerprint == fingerprint)?;
        e.last_used = Instant::now();
        Some(Arc::clone(&e.cluster))
    }

    fn touch(&self, io: &IoCtx) {
        let mut conns = self.shared.conns.lock().expect("rbd pool lock");
        for e in conns.values_mut() {
            if Arc::ptr_eq(&e.cluster, io.cluster()) {
                e.last_used = Instant::now();
            }
        }
    }

    /// Runs `f` on an I/O context of `pool` in a blocking thread: the one
    /// way async code calls librados / librbd.
    pub async fn run<R, F>(&self, creds: &Credentials, pool: &str, f: F) -> RbdResult<R>
    where
        F: FnOnce(&IoCtx) -> RbdResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let io = self.ioctx(creds, pool).await?;
        let io2 = Arc::clone(&io);
        self.shared.calls_since_trim.fetch_add(1, Ordering::Relaxed);
        let out = run_bounded(&self.shared.calls, move || f(&io2)).await?;
        self.touch(&io);
        out
    }

    /// Runs `f` on a blocking thread with an I/O context on the pool with
    /// id `pool_id` (ids carry pool ids, not names).
    pub async fn run_by_id<R, F>(&self, creds: &Credentials, pool_id: i64, f: F) -> RbdResult<R>
    where
        F: FnOnce(&IoCtx) -> RbdResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.run_by_id_in(&self.shared.calls, creds, pool_id, f)
            .await
    }

    /// Like [`Self::run_by_id`] for a long background job (a flatten): it
    /// waits for and holds a slot of its own small bound
    /// ([`MAX_FLATTENS`]), never one of the controller calls' slots.
    pub async fn run_background_by_id<R, F>(
        &self,
        creds: &Credentials,
        pool_id: i64,
        f: F,
    ) -> RbdResult<R>
    where
        F: FnOnce(&IoCtx) -> RbdResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.run_by_id_in(&self.shared.flattens, creds, pool_id, f)
            .await
    }

    async fn run_by_id_in<R, F>(
        &self,
        slots: &Arc<tokio::sync::Semaphore>,
        creds: &Credentials,
        pool_id: i64,
        f: F,
    ) -> RbdResult<R>
    where
        F: FnOnce(&IoCtx) -> RbdResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let key = ConnKey {
            mon_host: creds.mon_host.clone(),
            user: creds.user.clone(),
        };
        let fingerprint = self.shared.hasher.hash_one(creds.key.expose());
        let cluster = self.connection(creds, &key, fingerprint).await?;
        let c = Arc::clone(&cluster);
        self.shared.calls_since_trim.fetch_add(1, Ordering::Relaxed);
        let out = run_bounded(slots, move || f(&c.ioctx_by_id(pool_id)?)).await?;
        if let Some(e) = self
            .shared
            .conns
            .lock()
            .expect("rbd pool lock")
            .get_mut(&key)
        {
            e.last_used = Instant::now();
        }
        out
    }

    pub async fn create_image(
        &self,
        creds: &Credentials,
        pool: &str,
        name: &str,
        size: u64,
        options: &ImageOptions,
    ) -> RbdResult<()> {
        let (name, options) = (name.to_string(), options.clone());
        self.run(creds, pool, move |io| io.create(&name, size, &options))
            .await
    }

    pub async fn remove_image(&self, creds: &Credentials, pool: &str, name: &str) -> RbdResult<()> {
        let name = name.to_string();
        self.run(creds, pool, move |io| io.remove(&name)).await
    }

    /// Clone v2 of `parent@snap` to `child`, in the same pool.
    pub async fn clone_image(
        &self,
        creds: &Credentials,
        pool: &str,
        parent: &str,
        snap: &str,
        child: &str,
        options: &ImageOptions,
    ) -> RbdResult<()> {
        let (parent, snap, child) = (parent.to_string(), snap.to_string(), child.to_string());
        let options = options.clone();
        self.run(creds, pool, move |io| {
            io.clone_image(&parent, &snap, io, &child, &options)
        })
        .await
    }

    pub async fn resize_image(
        &self,
        creds: &Credentials,
        pool: &str,
        name: &str,
        size: u64,
    ) -> RbdResult<()> {
        let name = name.to_string();
        self.run(creds, pool, move |io| io.open(&name)?.resize(size))
            .await
    }

    pub async fn snap_create(
        &self,
        creds: &Credentials,
        pool: &str,
        name: &str,
        snap: &str,
    ) -> RbdResult<()> {
        let (name, snap) = (name.to_string(), snap.to_string());
        self.run(creds, pool, move |io| io.open(&name)?.snap_create(&snap))
            .await
    }

    pub async fn snap_remove(
        &self,
        creds: &Credentials,
        pool: &str,
        name: &str,
        snap: &str,
    ) -> RbdResult<()> {
        let (name, snap) = (name.to_string(), snap.to_string());
        self.run(creds, pool, move |io| io.open(&name)?.snap_remove(&snap))
            .await
    }

    pub async fn flatten_image(
        &self,
        creds: &Credentials,
        pool: &str,
        name: &str,
    ) -> RbdResult<()> {
        let name = name.to_string();
        self.run(creds, pool, move |io| io.open(&name)?.flatten())
            .await
    }

    pub async fn image_info(
        &self,
        creds: &Credentials,
        pool: &str,
        name: &str,
    ) -> RbdResult<ImageInfo> {
        let name = name.to_string();
        self.run(creds, pool, move |io| {
            io.open_read_only(&name, None)?.stat()
        })
        .await
    }

    pub async fn list_images(&self, creds: &Credentials, pool: &str) -> RbdResult<Vec<ImageSpec>> {
        self.run(creds, pool, |io| io.list()).await
    }

    pub async fn pool_stat(&self, creds: &Credentials, pool: &str) -> RbdResult<PoolStat> {
        self.run(creds, pool, |io| io.pool_stat()).await
    }
}

impl Drop for ConnectionPool {
    fn drop(&mut self) {
        self.reaper.abort();
        self.trimmer.abort();
        // Remaining connections shut down as their last Arc goes (here, or
        // in whichever call still holds one): rados_shutdown blocks briefly.
    }
}

/// Removes entries idle longer than `idle` (every entry not in use when
/// None) and shuts them down in a blocking thread.
async fn reap(shared: &Shared, idle: Option<Duration>) -> usize {
    let gone: Vec<Entry> = {
        let mut conns = shared.conns.lock().expect("rbd pool lock");
        let now = Instant::now();
        let keys: Vec<ConnKey> = conns
            .iter()
            .filter(|(_, e)| !e.in_use() && idle.is_none_or(|d| now - e.last_used >= d))
            .map(|(k, _)| k.clone())
            .collect();
        keys.iter().filter_map(|k| conns.remove(k)).collect()
    };
    let n = gone.len();
    drop_blocking(gone).await;
    n
}

/// Drops entries (ioctx destroy, rados_shutdown) off the async threads.
async fn drop_blocking(entries: Vec<Entry>) {
    if entries.is_empty() {
        return;
    }
    if let Err(e) = tokio::task::spawn_blocking(move || drop(entries)).await {
        tracing::warn!("rbd: shutting down ceph connections failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Callers that give up (their futures dropped, as a cancelled gRPC
    /// request's are) do not free a slot while their blocking work still
    /// runs: the bound holds for the work, not for the waiting.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bound_holds_under_cancelled_callers() {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CALLS));
        let (running, peak, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let work = || {
            let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
            move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(150));
                running.fetch_sub(1, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            }
        };
        // A first wave whose callers all give up after 20 ms, long before
        // their work is done.
        for _ in 0..2 * MAX_CALLS {
            let slots = slots.clone();
            let w = work();
            let _ = tokio::time::timeout(Duration::from_millis(20), async move {
                run_bounded(&slots, w).await
            })
            .await;
        }
        // A second wave that waits for its work.
        let tasks: Vec<_> = (0..2 * MAX_CALLS)
            .map(|_| {
                let slots = slots.clone();
                let w = work();
                tokio::spawn(async move { run_bounded(&slots, w).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert!(
            peak.load(Ordering::SeqCst) <= MAX_CALLS,
            "{} blocking calls ran at once",
            peak.load(Ordering::SeqCst)
        );
        // Every started piece of work finishes and gives its slot back.
        let deadline = Instant::now() + Duration::from_secs(10);
        while slots.available_permits() < MAX_CALLS && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(slots.available_permits(), MAX_CALLS);
        assert_eq!(running.load(Ordering::SeqCst), 0);
        assert!(done.load(Ordering::SeqCst) >= 2 * MAX_CALLS);
    }

    /// Background flattens have their own bound: with every flatten slot
    /// taken by long work, a controller call still runs at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flattens_do_not_take_call_slots() {
        use std::sync::atomic::AtomicBool;
        let pool = ConnectionPool::new(ConnectOptions::default(), Duration::from_secs(60));
        let shared = pool.shared.clone();
        let release = Arc::new(AtomicBool::new(false));
        let flattens: Vec<_> = (0..MAX_FLATTENS * 4)
            .map(|_| {
                let (shared, release) = (shared.clone(), release.clone());
                tokio::spawn(async move {
                    run_bounded(&shared.flattens, move || {
                        while !release.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    })
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.flattens_in_flight(), MAX_FLATTENS);
        assert_eq!(pool.calls_in_flight(), 0);
        let t0 = Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(5), run_bounded(&shared.calls, || 42))
            .await
            .expect("a call waited for flattens")
            .unwrap();
        assert_eq!(out, 42);
        assert!(t0.elapsed() < Duration::from_secs(1));
        release.store(true, Ordering::SeqCst);
        for f in flattens {
            f.await.unwrap().unwrap();
        }
        assert_eq!(pool.flattens_in_flight(), 0);
    }
}
