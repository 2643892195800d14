//! Safe, blocking wrappers over librados / librbd: [`Cluster`], [`IoCtx`],
//! [`Image`].
//!
//! **Every call here blocks** (network round trips to the monitors and
//! OSDs, milliseconds to seconds; `rados_connect` up to the connect timeout).
//! From async code run them under `tokio::task::spawn_blocking`, or use
//! [`super::pool::ConnectionPool`], which does that.
//!
//! Ownership and threads:
//! * [`Cluster`] owns a connected `rados_t` and shuts it down on drop. It is
//!   `Send + Sync`: librados' cluster handle is thread-safe once connected
//!   (all configuration happens before `rados_connect`, inside
//!   [`Cluster::connect`]).
//! * [`IoCtx`] owns a `rados_ioctx_t` and an `Arc<Cluster>` (the cluster must
//!   outlive its I/O contexts). `Send + Sync`: librados documents only the
//!   I/O context's *settings* (snapshot, namespace, locator) as not
//!   thread-safe, and this type never changes them.
//! * [`Image`] owns an open `rbd_image_t` and borrows its [`IoCtx`]; it is
//!   closed on drop. `Send` (it may move to another thread) but not `Sync`:
//!   one image handle is used by one thread at a time.
//!
//! The cephx key only ever lives in a [`Secret`] (zeroed on drop, redacted
//! in `Debug`) and in a temporary NUL-terminated copy handed to
//! `rados_conf_set("key", ...)`, zeroed right after. It never goes to argv,
//! the environment, a file or a log; the client admin socket (which could
//! dump the configuration) is disabled.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::error::{check, RbdError, RbdResult, ELOOP, ERANGE};
use super::ffi;

/// Overwrites `buf` with zeros in a way the optimiser keeps.
fn zero(buf: &mut [u8]) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference.
        unsafe { ptr::write_volatile(b, 0) };
    }
    compiler_fence(Ordering::SeqCst);
}

/// Key material (a cephx secret, base64). Zeroed when dropped; `Debug`
/// never shows it. Deliberately not `Clone` and not `Display`.
pub struct Secret(Vec<u8>);

impl Secret {
    /// Takes ownership of the string's buffer (no copy is left behind).
    pub fn new(key: String) -> Secret {
        Secret(key.into_bytes())
    }

    pub fn from_bytes(key: Vec<u8>) -> Secret {
        Secret(key)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn expose(&self) -> &[u8] {
        &self.0
    }

    /// A second copy, for handing to a blocking thread; zeroed on drop too.
    pub(crate) fn duplicate(&self) -> Secret {
        Secret(self.0.clone())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        zero(&mut self.0);
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Who to connect as, and where.
#[derive(Debug)]
pub struct Credentials {
    /// librados `mon_host` syntax: `10.0.0.1:6789,10.0.0.2:6789` or
    /// `[v2:127.0.0.1:3300,v1:127.0.0.1:6789]`.
    pub mon_host: String,
    /// cephx id without `client.` (e.g. `lodestone`); a leading `client.` is
    /// accepted.
    pub user: String,
    pub key: Secret,
}

/// Connection knobs (librados configuration set before connecting).
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `client_mount_timeout`: how long `rados_connect` may take.
    pub connect_timeout: Duration,
    /// `rados_mon_op_timeout` and `rados_osd_op_timeout`: a bound on each
    /// monitor / OSD request (zero: wait for ever, librados' default).
    pub op_timeout: Duration,
    /// Further `rados_conf_set` options, applied last. Never put a key here.
    pub extra: Vec<(String, String)>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(30),
            op_timeout: Duration::from_secs(60),
            extra: Vec::new(),
        }
    }
}

fn cstring(s: &str, what: impl FnOnce() -> String) -> RbdResult<CString> {
    CString::new(s).map_err(|_| RbdError::InvalidArgument {
        what: format!("{} (contains a NUL byte)", what()),
    })
}

/// Copies a C string owned by librados/librbd (NULL → empty).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for this call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The string in `buf` up to its first NUL.
fn from_buf(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Ceph's wire encoding of the two shapes the `rbd` object class methods
/// used here take and return (little-endian u32 lengths).
mod denc {
    /// A length-prefixed string.
    pub(super) fn put(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }

    /// `std::map<std::string, bufferlist>`.
    pub(super) fn string_map(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
        for (k, v) in pairs {
            put(&mut out, k.as_bytes());
            put(&mut out, v.as_bytes());
        }
        out
    }

    fn take<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
        let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
        let body = buf.get(4..4 + len)?;
        *buf = &buf[4 + len..];
        Some(body)
    }

    /// `std::map<std::string, bufferlist>` (values as UTF-8), the whole input.
    pub(super) fn string_pairs(mut buf: &[u8]) -> Option<Vec<(String, String)>> {
        let n = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?);
        buf = &buf[4..];
        let mut out = Vec::new();
        for _ in 0..n {
            let k = String::from_utf8(take(&mut buf)?.to_vec()).ok()?;
            let v = String::from_utf8(take(&mut buf)?.to_vec()).ok()?;
            out.push((k, v));
        }
        buf.is_empty().then_some(out)
    }

    /// `std::string`, the whole input.
    pub(super) fn string(buf: &[u8]) -> Option<String> {
        let len = u32::from_le_bytes(buf.get(..4)?.try_into().ok()?) as usize;
        let body = buf.get(4..)?;
        (body.len() == len).then(|| String::from_utf8(body.to_vec()).ok())?
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trip_shapes() {
            assert_eq!(
                super::string_map(&[("ab", "c")]),
                [1, 0, 0, 0, 2, 0, 0, 0, b'a', b'b', 1, 0, 0, 0, b'c']
            );
            assert_eq!(
                super::string(&[3, 0, 0, 0, b'1', b'2', b'f']).as_deref(),
                Some("12f")
            );
            assert_eq!(super::string(&[3, 0, 0, 0, b'1']), None);
            assert_eq!(super::string(&[1, 0]), None);
            let map = super::string_map(&[("ab", "c"), ("d", "")]);
            assert_eq!(
                super::string_pairs(&map),
                Some(vec![("ab".into(), "c".into()), ("d".into(), String::new())])
            );
            assert_eq!(super::string_pairs(&map[..map.len() - 1]), None);
        }
    }
}

/// Bounds retries of "buffer too short" (-ERANGE) loops.
const MAX_GROW: usize = 16;

/// Cluster-wide usage (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterStat {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub objects: u64,
}

/// A pool's usage. Zero everywhere on a cluster without a running mgr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStat {
    /// Bytes stored, replication included (`num_bytes`).
    pub bytes: u64,
    /// Bytes as written by clients (`num_user_bytes`).
    pub user_bytes: u64,
    pub objects: u64,
}

/// A connected cluster handle (`rados_t`), shut down on drop.
pub struct Cluster {
    handle: ffi::rados_t,
    /// `client.<id>`, for messages.
    name: String,
    mon_host: String,
}

// SAFETY: librados' cluster handle is thread-safe after rados_connect; this
// type only exists connected (configuration happens in `connect`), and
// `rados_shutdown` runs once, in Drop, when no other reference is left.
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("mon_host", &self.mon_host)
            .finish()
    }
}

impl Cluster {
    /// Creates a handle for `client.<user>`, configures it only from
    /// `creds` and `opts` (no ceph.conf, no keyring file is read), and
    /// connects. Blocks up to `opts.connect_timeout`.
    pub fn connect(creds: &Credentials, opts: &ConnectOptions) -> RbdResult<Cluster> {
        let id = creds.user.strip_prefix("client.").unwrap_or(&creds.user);
        if id.is_empty() {
            return Err(RbdError::InvalidArgument {
                what: "ceph user id is empty".into(),
            });
        }
        if creds.key.is_empty() {
            return Err(RbdError::InvalidArgument {
                what: format!("cephx key of client.{id} is empty"),
            });
        }
        let name = format!("client.{id}");
        let c_name = cstring(&name, || "ceph user id".into())?;
        let mut handle: ffi::rados_t = ptr::null_mut();
        // SAFETY: valid out pointer and NUL-terminated strings.
        let ret = unsafe { ffi::rados_create2(&mut handle, c"ceph".as_ptr(), c_name.as_ptr(), 0) };
        check(ret.into(), || format!("rados_create2 {name}"))?;
        // From here on Drop shuts the handle down, connected or not.
        let cluster = Cluster {
            handle,
            name,
            mon_host: creds.mon_host.clone(),
        };
        cluster.conf_set("mon_host", &creds.mon_host)?;
        cluster.conf_set_key(&creds.key)?;
        // No client admin socket: it could dump the configuration (key
        // included) and it needs a writable run directory.
        cluster.conf_set("admin_socket", "")?;
        cluster.conf_set("client_mount_timeout", &secs(opts.connect_timeout))?;
        cluster.conf_set("rados_mon_op_timeout", &secs(opts.op_timeout))?;
        cluster.conf_set("rados_osd_op_timeout", &secs(opts.op_timeout))?;
        for (k, v) in &opts.extra {
            if k == "key" || k == "keyring" || k == "keyfile" {
                return Err(RbdError::InvalidArgument {
                    what: format!("connect option {k} (pass keys in Credentials)"),
                });
            }
            cluster.conf_set(k, v)?;
        }
        // SAFETY: configured handle, connected once.
        let ret = unsafe { ffi::rados_connect(cluster.handle) };
        check(ret.into(), || {
            format!("rados_connect to {} as {}", cluster.mon_host, cluster.name)
        })?;
        Ok(cluster)
    }

    fn conf_set(&self, option: &str, value: &str) -> RbdResult<()> {
        let what = || format!("rados_conf_set {option}={value}");
        let c_opt = cstring(option, what)?;
        let c_val = cstring(value, what)?;
        // SAFETY: live handle, NUL-terminated strings copied by librados.
        let ret = unsafe { ffi::rados_conf_set(self.handle, c_opt.as_ptr(), c_val.as_ptr()) };
        check(ret.into(), what).map(drop)
    }

    /// `rados_conf_set("key", ...)` from a zeroed-after-use copy.
    fn conf_set_key(&self, key: &Secret) -> RbdResult<()> {
        let what = || format!("rados_conf_set key of {} (value not shown)", self.name);
        if key.expose().contains(&0) {
            return Err(RbdError::InvalidArgument { what: what() });
        }
        let mut buf = Vec::with_capacity(key.expose().len() + 1);
        buf.extend_from_slice(key.expose());
        buf.push(0);
        // SAFETY: live handle; `buf` is NUL-terminated and outlives the call.
        let ret = unsafe { ffi::rados_conf_set(self.handle, c"key".as_ptr(), buf.as_ptr().cast()) };
        zero(&mut buf);
        check(ret.into(), what).map(drop)
    }

    /// `client.<id>` this handle authenticated as.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn mon_host(&self) -> &str {
        &self.mon_host
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> RbdResult<String> {
        let mut buf = [0u8; 64];
        // SAFETY: live handle, buffer of the given length.
        let ret =
            unsafe { ffi::rados_cluster_fsid(self.handle, buf.as_mut_ptr().cast(), buf.len()) };
        check(ret.into(), || "rados_cluster_fsid".into())?;
        Ok(from_buf(&buf))
    }

    /// The id of pool `pool` (NotFound when there is none).
    pub fn pool_lookup(&self, pool: &str) -> RbdResult<i64> {
        let c_pool = cstring(pool, || format!("pool name {pool:?}"))?;
        // SAFETY: live handle, NUL-terminated string.
        let ret = unsafe { ffi::rados_pool_lookup(self.handle, c_pool.as_ptr()) };
        check(ret, || format!("rados_pool_lookup {pool}"))
    }

    /// Cluster-wide usage (eventually consistent; zero without a mgr).
    pub fn stat(&self) -> RbdResult<ClusterStat> {
        let mut st = ffi::rados_cluster_stat_t::default();
        // SAFETY: live handle, valid out struct.
        let ret = unsafe { ffi::rados_cluster_stat(self.handle, &mut st) };
        check(ret.into(), || "rados_cluster_stat".into())?;
        Ok(ClusterStat {
            total_bytes: st.kb.saturating_mul(1024),
            used_bytes: st.kb_used.saturating_mul(1024),
            available_bytes: st.kb_avail.saturating_mul(1024),
            objects: st.num_objects,
        })
    }

    /// Sends a command to the monitors (`cmd` is its JSON, e.g.
    /// `{"prefix":"df","format":"json"}`) and returns its output.
    pub fn mon_command(&self, cmd: &str) -> RbdResult<Vec<u8>> {
        let what = || format!("rados_mon_command {cmd}");
        let c_cmd = cstring(cmd, what)?;
        let cmds = [c_cmd.as_ptr()];
        let (mut out, mut out_len) = (ptr::null_mut::<c_char>(), 0usize);
        let (mut status, mut status_len) = (ptr::null_mut::<c_char>(), 0usize);
        // SAFETY: live handle; one NUL-terminated command; no input; the
        // out pointers are valid; librados allocates what it returns.
        let ret = unsafe {
            ffi::rados_mon_command(
                self.handle,
                cmds.as_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        // SAFETY: buffers of the lengths given (or NULL), freed once with
        // librados' own release function.
        let (body, status_text) = unsafe {
            let copy = |p: *mut c_char, n: usize| {
                if p.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(p.cast::<u8>(), n).to_vec()
                }
            };
            let r = (copy(out, out_len), copy(status, status_len));
            if !out.is_null() {
                ffi::rados_buffer_free(out);
            }
            if !status.is_null() {
                ffi::rados_buffer_free(status);
            }
            r
        };
        check(ret.into(), || {
            format!("{}: {}", what(), String::from_utf8_lossy(&status_text))
        })?;
        Ok(body)
    }

    /// An I/O context on pool `pool` (NotFound when there is none).
    pub fn ioctx(self: &Arc<Self>, pool: &str) -> RbdResult<IoCtx> {
        let c_pool = cstring(pool, || format!("pool name {pool:?}"))?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: live handle, valid out pointer.
        let ret = unsafe { ffi::rados_ioctx_create(self.handle, c_pool.as_ptr(), &mut io) };
        check(ret.into(), || format!("rados_ioctx_create {pool}"))?;
        Ok(IoCtx {
            handle: io,
            pool: pool.to_string(),
            cluster: Arc::clone(self),
        })
    }

    /// An I/O context on the pool with id `pool_id`.
    pub fn ioctx_by_id(self: &Arc<Self>, pool_id: i64) -> RbdResult<IoCtx> {
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: live handle, valid out pointer.
        let ret = unsafe { ffi::rados_ioctx_create2(self.handle, pool_id, &mut io) };
        check(ret.into(), || {
            format!("rados_ioctx_create2 pool id {pool_id}")
        })?;
        let mut io = IoCtx {
            handle: io,
            pool: format!("#{pool_id}"),
            cluster: Arc::clone(self),
        };
        // The name, from the cluster map this client holds (no round trip):
        // placement compares pools by name.
        let mut buf = [0u8; 256];
        // SAFETY: live ioctx; `buf` holds the length given.
        let ret = unsafe {
            ffi::rados_ioctx_get_pool_name(io.handle, buf.as_mut_ptr().cast(), buf.len() as u32)
        };
        check(ret.into(), || {
            format!("rados_ioctx_get_pool_name of pool id {pool_id}")
        })?;
        io.pool = from_buf(&buf);
        Ok(io)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: created by rados_create2, shut down exactly once; every
        // IoCtx holds an Arc<Cluster>, so none is left.
        unsafe { ffi::rados_shutdown(self.handle) };
    }
}

fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// Options for new images (format 2 always).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageOptions {
    /// Feature bits (`ffi::RBD_FEATURE_*`); None: the cluster's default
    /// (`rbd_default_features`).
    pub features: Option<u64>,
    /// Object size as a power of two (22 = 4 MiB); None: default.
    pub order: Option<u8>,
    /// Erasure-coded (or other) pool for the data objects.
    pub data_pool: Option<String>,
}

pub const DEFAULT_FEATURES: u64 = ffi::RBD_FEATURE_LAYERING
    | ffi::RBD_FEATURE_EXCLUSIVE_LOCK
    | ffi::RBD_FEATURE_OBJECT_MAP
    | ffi::RBD_FEATURE_FAST_DIFF
    | ffi::RBD_FEATURE_DEEP_FLATTEN;

/// An `rbd_image_options_t`, destroyed on drop.
struct Opts(ffi::rbd_image_options_t);

impl Opts {
    fn new(o: &ImageOptions) -> RbdResult<Opts> {
        let mut h: ffi::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out pointer.
        unsafe { ffi::rbd_image_options_create(&mut h) };
        let opts = Opts(h);
        opts.set_u64(ffi::RBD_IMAGE_OPTION_FORMAT, 2, "format")?;
        if let Some(f) = o.features {
            opts.set_u64(ffi::RBD_IMAGE_OPTION_FEATURES, f, "features")?;
        }
        if let Some(order) = o.order {
            opts.set_u64(ffi::RBD_IMAGE_OPTION_ORDER, order.into(), "order")?;
        }
        if let Some(pool) = &o.data_pool {
            let c = cstring(pool, || format!("data pool {pool:?}"))?;
            // SAFETY: live options, NUL-terminated string (copied).
            let ret = unsafe {
                ffi::rbd_image_options_set_string(
                    opts.0,
                    ffi::RBD_IMAGE_OPTION_DATA_POOL,
                    c.as_ptr(),
                )
            };
            check(ret.into(), || format!("image option data_pool={pool}"))?;
        }
        Ok(opts)
    }

    fn set_u64(&self, key: c_int, value: u64, name: &str) -> RbdResult<()> {
        // SAFETY: live options.
        let ret = unsafe { ffi::rbd_image_options_set_uint64(self.0, key, value) };
        check(ret.into(), || format!("image option {name}={value}")).map(drop)
    }
}

impl Drop for Opts {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(self.0) };
    }
}

/// An image as `rbd_list2` reports it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageSpec {
    pub name: String,
    pub id: String,
}

/// An image in the pool's trash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrashEntry {
    pub id: String,
    pub name: String,
    /// `ffi::RBD_TRASH_IMAGE_SOURCE_*`: USER for a `trash move`, REMOVING
    /// for an image `rbd_remove` moved there on its way out.
    pub source: i32,
}

/// An image in a parent/child relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkedImage {
    pub pool_id: i64,
    pub pool_name: String,
    pub pool_namespace: String,
    pub image_id: String,
    pub image_name: String,
    /// The image is in the trash.
    pub trash: bool,
}

/// A clone's parent: the image and the snapshot it was cloned from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub image: LinkedImage,
    pub snap_id: u64,
    /// For a user snapshot its name; for a snapshot removed while clones
    /// still used it (clone v2 moves it to the trash namespace), librbd's
    /// internal name.
    pub snap_name: String,
    /// `ffi::RBD_SNAP_NAMESPACE_TYPE_*`.
    pub snap_namespace: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: String,
    /// `ffi::RBD_SNAP_NAMESPACE_TYPE_*`: USER for snapshots we made; TRASH
    /// for one removed while clone v2 children still use it (its name is
    /// then librbd's, not ours).
    pub namespace: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub size: u64,
    pub object_size: u64,
    pub objects: u64,
    pub order: i32,
}

/// An I/O context on one pool.
pub struct IoCtx {
    handle: ffi::rados_ioctx_t,
    pool: String,
    cluster: Arc<Cluster>,
}

// SAFETY: librados I/O contexts may be used from several threads as long as
// their settings (snapshot context, namespace, locator key) do not change
// concurrently; IoCtx never changes them. Destroyed once, in Drop.
unsafe impl Send for IoCtx {}
unsafe impl Sync for IoCtx {}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx")
            .field("pool", &self.pool)
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create*, destroyed once; Images
        // borrow the IoCtx, so none is open; the cluster (Arc) is alive.
        unsafe { ffi::rados_ioctx_destroy(self.handle) };
    }
}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.pool
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    pub fn pool_id(&self) -> i64 {
        // SAFETY: live ioctx.
        unsafe { ffi::rados_ioctx_get_id(self.handle) }
    }

    fn spec(&self, name: &str) -> String {
        format!("{}/{}", self.pool, name)
    }

    /// The pool's usage (eventually consistent; zero without a mgr).
    pub fn pool_stat(&self) -> RbdResult<PoolStat> {
        let mut st = ffi::rados_pool_stat_t::default();
        // SAFETY: live ioctx, valid out struct.
        let ret = unsafe { ffi::rados_ioctx_pool_stat(self.handle, &mut st) };
        check(ret.into(), || {
            format!("rados_ioctx_pool_stat {}", self.pool)
        })?;
        Ok(PoolStat {
            bytes: st.num_bytes,
            user_bytes: st.num_user_bytes,
            objects: st.num_objects,
        })
    }

    /// Creates image `name` of `size` bytes (Exists if there is one).
    pub fn create(&self, name: &str, size: u64, options: &ImageOptions) -> RbdResult<()> {
        let what = || format!("rbd_create4 {}", self.spec(name));
        let c_name = cstring(name, what)?;
        let opts = Opts::new(options)?;
        // SAFETY: live ioctx and options, NUL-terminated name.
        let ret = unsafe { ffi::rbd_create4(self.handle, c_name.as_ptr(), size, opts.0) };
        check(ret.into(), what).map(drop)
    }

    /// Clones `parent@snap` (in this pool) to `child` in `child_io`'s pool,
    /// as a clone v2 (no snapshot protection needed; the snapshot can be
    /// removed while clones use it).
    pub fn clone_image(
        &self,
        parent: &str,
        snap: &str,
        child_io: &IoCtx,
        child: &str,
        options: &ImageOptions,
    ) -> RbdResult<()> {
        let what = || {
            format!(
                "rbd_clone3 {}@{snap} -> {}",
                self.spec(parent),
                child_io.spec(child)
            )
        };
        let c_parent = cstring(parent, what)?;
        let c_snap = cstring(snap, what)?;
        let c_child = cstring(child, what)?;
        let opts = Opts::new(options)?;
        opts.set_u64(ffi::RBD_IMAGE_OPTION_CLONE_FORMAT, 2, "clone_format")?;
        // SAFETY: live ioctxs and options, NUL-terminated strings.
        let ret = unsafe {
            ffi::rbd_clone3(
                self.handle,
                c_parent.as_ptr(),
                c_snap.as_ptr(),
                child_io.handle,
                c_child.as_ptr(),
                opts.0,
            )
        };
        check(ret.into(), what).map(drop)
    }

    /// Removes image `name` (NotFound if absent; NotEmpty with snapshots;
    /// Busy while open/mapped elsewhere).
    pub fn remove(&self, name: &str) -> RbdResult<()> {
        let what = || format!("rbd_remove {}", self.spec(name));
        let c_name = cstring(name, what)?;
        // SAFETY: live ioctx, NUL-terminated name.
        let ret = unsafe { ffi::rbd_remove(self.handle, c_name.as_ptr()) };
        check(ret.into(), what).map(drop)
    }

    /// Moves image `name` to the pool's trash; it may be removed for good
    /// after `delay` seconds. Use [`Image::id`] first to know its id.
    pub fn trash_move(&self, name: &str, delay: Duration) -> RbdResult<()> {
        let what = || format!("rbd_trash_move {}", self.spec(name));
        let c_name = cstring(name, what)?;
        // SAFETY: live ioctx, NUL-terminated name.
        let ret = unsafe { ffi::rbd_trash_move(self.handle, c_name.as_ptr(), delay.as_secs()) };
        check(ret.into(), what).map(drop)
    }

    /// Removes the trashed image with id `id`; `force` ignores its
    /// deferment time.
    pub fn trash_remove(&self, id: &str, force: bool) -> RbdResult<()> {
        let what = || format!("rbd_trash_remove {} (id {id})", self.pool);
        let c_id = cstring(id, what)?;
        // SAFETY: live ioctx, NUL-terminated id.
        let ret = unsafe { ffi::rbd_trash_remove(self.handle, c_id.as_ptr(), force) };
        check(ret.into(), what).map(drop)
    }

    /// Puts the trashed image with id `id` back as `name`.
    pub fn trash_restore(&self, id: &str, name: &str) -> RbdResult<()> {
        let what = || format!("rbd_trash_restore {} (id {id}) as {name}", self.pool);
        let c_id = cstring(id, what)?;
        let c_name = cstring(name, what)?;
        // SAFETY: live ioctx, NUL-terminated strings.
        let ret = unsafe { ffi::rbd_trash_restore(self.handle, c_id.as_ptr(), c_name.as_ptr()) };
        check(ret.into(), what).map(drop)
    }

    /// The images in the pool's trash.
    pub fn trash_list(&self) -> RbdResult<Vec<TrashEntry>> {
        let what = || format!("rbd_trash_list {}", self.pool);
        let mut cap: usize = 16;
        for _ in 0..MAX_GROW {
            let mut entries = vec![
                ffi::rbd_trash_image_info_t {
                    id: ptr::null_mut(),
                    name: ptr::null_mut(),
                    source: 0,
                    deletion_time: 0,
                    deferment_end_time: 0,
                };
                cap
            ];
            let mut max = cap;
            // SAFETY: live ioctx; `entries` holds `max` zeroed entries.
            let ret = unsafe { ffi::rbd_trash_list(self.handle, entries.as_mut_ptr(), &mut max) };
            if ret == -ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            check(ret.into(), what)?;
            let n = max.min(cap);
            // SAFETY: the n entries librbd filled, released once.
            let out = unsafe {
                let out = entries[..n]
                    .iter()
                    .map(|e| TrashEntry {
                        id: owned(e.id),
                        name: owned(e.name),
                        source: e.source,
                    })
                    .collect();
                ffi::rbd_trash_list_cleanup(entries.as_mut_ptr(), n);
                out
            };
            return Ok(out);
        }
        Err(RbdError::from_errno(-(ERANGE as i64), what()))
    }

    /// Names of the snapshots of the image with id `image_id` (every
    /// namespace; librbd renames a snapshot it moves to the trash namespace
    /// to a UUID), read from its header object without opening it.
    pub fn snapshot_names_unopened(&self, image_id: &str) -> RbdResult<Vec<String>> {
        let object = format!("rbd_header.{image_id}");
        let out = self.exec_rbd(&object, "get_snapcontext", &[], 64 << 10)?;
        // u64 seq, u32 count, count x u64 snapshot ids
        let ids = out
            .get(8..12)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .and_then(|n| {
                let body = out.get(12..)?;
                (body.len() == n as usize * 8).then(|| {
                    body.chunks(8)
                        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect::<Vec<u64>>()
                })
            })
            .ok_or_else(|| self.malformed("get_snapcontext", image_id))?;
        let mut names = Vec::with_capacity(ids.len());
        for id in ids {
            match self.exec_rbd(&object, "get_snapshot_name", &id.to_le_bytes(), 512) {
                Ok(out) => names.push(
                    denc::string(&out)
                        .ok_or_else(|| self.malformed("get_snapshot_name", image_id))?,
                ),
                // removed since the snapshot context was read
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(names)
    }

    /// Calls `method` of the OSD object class `rbd` on `object`: one round
    /// trip, the way librbd itself reads and writes its objects. `out_cap`
    /// bounds the reply.
    fn exec_rbd(
        &self,
        object: &str,
        method: &str,
        input: &[u8],
        out_cap: usize,
    ) -> RbdResult<Vec<u8>> {
        let what = || format!("rados_exec rbd.{method} on {}/{object}", self.pool);
        let c_obj = cstring(object, what)?;
        let c_method = cstring(method, what)?;
        let mut out = vec![0u8; out_cap];
        // SAFETY: live ioctx; NUL-terminated names; `input` and `out` are
        // valid for the lengths given.
        let ret = unsafe {
            ffi::rados_exec(
                self.handle,
                c_obj.as_ptr(),
                c"rbd".as_ptr(),
                c_method.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
            )
        };
        let n = check(ret.into(), what)?;
        out.truncate(n as usize);
        Ok(out)
    }

    /// A reply of the rbd object class that does not decode.
    fn malformed(&self, method: &str, object: &str) -> RbdError {
        RbdError::Other {
            errno: super::error::EIO,
            what: format!("rbd.{method} on {}/{object}: malformed reply", self.pool),
        }
    }

    /// The id of image `name`, read from its id object (no image open).
    pub fn image_id(&self, name: &str) -> RbdResult<String> {
        let out = self.exec_rbd(&format!("rbd_id.{name}"), "get_id", &[], 256)?;
        denc::string(&out).ok_or_else(|| self.malformed("get_id", name))
    }

    /// Sets image metadata on the image with id `image_id` in a single OSD
    /// operation (every pair or none), without opening the image: an open
    /// costs several round trips and, with exclusive-lock, taking the lock.
    /// Only for an image nobody has open (e.g. one just created or cloned):
    /// handles are not told of the change.
    pub fn metadata_set_unopened(&self, image_id: &str, pairs: &[(&str, &str)]) -> RbdResult<()> {
        self.exec_rbd(
            &format!("rbd_header.{image_id}"),
            "metadata_set",
            &denc::string_map(pairs),
            0,
        )
        .map(drop)
    }

    /// Size in bytes of the image with id `image_id` (its head), read from
    /// its header object without opening it.
    pub fn image_size_unopened(&self, image_id: &str) -> RbdResult<u64> {
        const CEPH_NOSNAP: u64 = u64::MAX - 1;
        let out = self.exec_rbd(
            &format!("rbd_header.{image_id}"),
            "get_size",
            &CEPH_NOSNAP.to_le_bytes(),
            16,
        )?;
        // u8 order, u64 size
        out.get(1..9)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| self.malformed("get_size", image_id))
    }

    /// Whether the image with id `image_id` has a parent (is a clone),
    /// read from its header object without opening it (`rbd.parent_get`:
    /// a versioned parent spec whose pool id is -1 for none).
    pub fn has_parent_unopened(&self, image_id: &str) -> RbdResult<bool> {
        let out = self.exec_rbd(&format!("rbd_header.{image_id}"), "parent_get", &[], 512)?;
        // u8 version, u8 compat, u32 length, then i64 pool id
        out.get(6..14)
            .and_then(|b| b.try_into().ok())
            .map(|b| i64::from_le_bytes(b) >= 0)
            .ok_or_else(|| self.malformed("parent_get", image_id))
    }

    /// Creation time (Unix seconds) of the image with id `image_id`, from
    /// its header object without opening it.
    pub fn image_created_unopened(&self, image_id: &str) -> RbdResult<i64> {
        let out = self.exec_rbd(
            &format!("rbd_header.{image_id}"),
            "get_create_timestamp",
            &[],
            16,
        )?;
        // utime_t: u32 seconds, u32 nanoseconds
        out.get(..4)
            .and_then(|b| b.try_into().ok())
            .map(|b| i64::from(u32::from_le_bytes(b)))
            .ok_or_else(|| self.malformed("get_create_timestamp", image_id))
    }

    /// Image metadata of the image with id `image_id` whose keys start with
    /// `prefix` (at most 64 of them), from its header object without
    /// opening it.
    pub fn metadata_unopened(
        &self,
        image_id: &str,
        prefix: &str,
    ) -> RbdResult<Vec<(String, String)>> {
        const MAX: u64 = 64;
        // start after the prefix itself (keys are sorted), at most MAX keys
        let mut input = Vec::new();
        denc::put(&mut input, prefix.as_bytes());
        input.extend_from_slice(&MAX.to_le_bytes());
        let object = format!("rbd_header.{image_id}");
        let mut cap = 16 << 10;
        for _ in 0..MAX_GROW {
            match self.exec_rbd(&object, "metadata_list", &input, cap) {
                Err(e) if e.errno() == ERANGE => cap *= 4,
                Err(e) => return Err(e),
                Ok(out) => {
                    let pairs = denc::string_pairs(&out)
                        .ok_or_else(|| self.malformed("metadata_list", image_id))?;
                    return Ok(pairs
                        .into_iter()
                        .filter(|(k, _)| k.starts_with(prefix))
                        .collect());
                }
            }
        }
        Err(RbdError::from_errno(
            -(ERANGE as i64),
            format!("rbd.metadata_list of {}/{image_id}", self.pool),
        ))
    }

    /// Every image in the pool (trash excluded), sorted by name.
    pub fn list(&self) -> RbdResult<Vec<ImageSpec>> {
        let what = || format!("rbd_list2 {}", self.pool);
        let mut cap: usize = 64;
        for _ in 0..MAX_GROW {
            let mut specs = vec![
                ffi::rbd_image_spec_t {
                    id: ptr::null_mut(),
                    name: ptr::null_mut(),
                };
                cap
            ];
            let mut max = cap;
            // SAFETY: live ioctx; `specs` holds `max` zeroed entries.
            let ret = unsafe { ffi::rbd_list2(self.handle, specs.as_mut_ptr(), &mut max) };
            if ret == -ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            check(ret.into(), what)?;
            let n = max.min(cap);
            let mut out: Vec<ImageSpec> = specs[..n]
                .iter()
                .map(|s| ImageSpec {
                    // SAFETY: librbd filled NUL-terminated strings (or NULL).
                    name: unsafe { owned(s.name) },
                    id: unsafe { owned(s.id) },
                })
                .collect();
            // SAFETY: the n entries librbd filled, released once.
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            out.sort();
            return Ok(out);
        }
        Err(RbdError::from_errno(-(ERANGE as i64), what()))
    }

    /// Opens image `name` read-write (NotFound if absent).
    pub fn open(&self, name: &str) -> RbdResult<Image<'_>> {
        self.open_with(name, None, false, false)
    }

    /// Opens image `name` read-only, at snapshot `snap` if given.
    /// Establishes no watch: fine for reading metadata, not for long use.
    pub fn open_read_only(&self, name: &str, snap: Option<&str>) -> RbdResult<Image<'_>> {
        self.open_with(name, snap, true, false)
    }

    /// Opens the image with id `id` read-only (works for trashed images).
    pub fn open_by_id_read_only(&self, id: &str) -> RbdResult<Image<'_>> {
        self.open_with(id, None, true, true)
    }

    /// Opens the image with id `id` read-write (works for trashed images).
    pub fn open_by_id(&self, id: &str) -> RbdResult<Image<'_>> {
        self.open_with(id, None, false, true)
    }

    fn open_with(
        &self,
        name: &str,
        snap: Option<&str>,
        read_only: bool,
        by_id: bool,
    ) -> RbdResult<Image<'_>> {
        let label = match (by_id, snap) {
            (true, _) => format!("{} (id {name})", self.pool),
            (false, Some(s)) => format!("{}@{s}", self.spec(name)),
            (false, None) => self.spec(name),
        };
        let what = || format!("rbd_open {label}");
        let c_name = cstring(name, what)?;
        let c_snap = snap.map(|s| cstring(s, what)).transpose()?;
        let snap_ptr = c_snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: live ioctx, valid out pointer, NUL-terminated strings or
        // NULL for "no snapshot".
        let ret = unsafe {
            match (by_id, read_only) {
                (true, true) => ffi::rbd_open_by_id_read_only(
                    self.handle,
                    c_name.as_ptr(),
                    &mut image,
                    snap_ptr,
                ),
                (true, false) => {
                    ffi::rbd_open_by_id(self.handle, c_name.as_ptr(), &mut image, snap_ptr)
                }
                (false, true) => {
                    ffi::rbd_open_read_only(self.handle, c_name.as_ptr(), &mut image, snap_ptr)
                }
                (false, false) => ffi::rbd_open(self.handle, c_name.as_ptr(), &mut image, snap_ptr),
            }
        };
        check(ret.into(), what)?;
        Ok(Image {
            handle: image,
            label,
            _io: PhantomData,
        })
    }

    /// How many ancestors image `name` has (0: not a clone, or flattened).
    /// Follows parents across pools of the same cluster; walks at most 64.
    pub fn clone_depth(&self, name: &str) -> RbdResult<usize> {
        let mut parent = self.open_read_only(name, None)?.parent()?;
        let mut depth = 0;
        while let Some(p) = parent {
            depth += 1;
            if depth > 64 {
                return Err(RbdError::Other {
                    errno: ELOOP,
                    what: format!("clone chain of {} longer than 64", self.spec(name)),
                });
            }
            if !p.image.pool_namespace.is_empty() {
                return Err(RbdError::InvalidArgument {
                    what: format!(
                        "parent {}/{}/{} is in a namespace (unsupported)",
                        p.image.pool_name, p.image.pool_namespace, p.image.image_name
                    ),
                });
            }
            let other;
            let io = if p.image.pool_id == self.pool_id() {
                self
            } else {
                other = self.cluster.ioctx_by_id(p.image.pool_id)?;
                &other
            };
            let img = io.open_by_id_read_only(&p.image.image_id)?;
            img.set_snap_by_id(p.snap_id)?;
            parent = img.parent()?;
        }
        Ok(depth)
    }
}

/// An open image, closed on drop. Not `Sync`: one thread at a time.
pub struct Image<'io> {
    handle: ffi::rbd_image_t,
    /// `pool/name[@snap]` or `pool (id ...)`, for messages.
    label: String,
    _io: PhantomData<&'io IoCtx>,
}

// SAFETY: an rbd_image_t is not tied to the thread that opened it; moving
// the handle to another thread is fine. It is deliberately not Sync.
unsafe impl Send for Image<'_> {}

impl std::fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Image").field(&self.label).finish()
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed once.
        let ret = unsafe { ffi::rbd_close(self.handle) };
        if ret < 0 {
            tracing::warn!(image = %self.label, "{}", RbdError::from_errno(ret.into(), "rbd_close"));
        }
    }
}

impl Image<'_> {
    /// `pool/name[@snap]` as opened.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn what(&self, call: &str) -> String {
        format!("{call} {}", self.label)
    }

    pub fn size(&self) -> RbdResult<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out pointer.
        let ret = unsafe { ffi::rbd_get_size(self.handle, &mut size) };
        check(ret.into(), || self.what("rbd_get_size"))?;
        Ok(size)
    }

    pub fn stat(&self) -> RbdResult<ImageInfo> {
        // SAFETY: all-zero is a valid rbd_image_info_t (integers, arrays).
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image, out struct of the given size.
        let ret = unsafe {
            ffi::rbd_stat(
                self.handle,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        };
        check(ret.into(), || self.what("rbd_stat"))?;
        Ok(ImageInfo {
            size: info.size,
            object_size: info.obj_size,
            objects: info.num_objs,
            order: info.order,
        })
    }

    pub fn features(&self) -> RbdResult<u64> {
        let mut f = 0u64;
        // SAFETY: open image, valid out pointer.
        let ret = unsafe { ffi::rbd_get_features(self.handle, &mut f) };
        check(ret.into(), || self.what("rbd_get_features"))?;
        Ok(f)
    }

    /// The image's id (stable across renames; names it in the trash).
    pub fn id(&self) -> RbdResult<String> {
        let mut len = 64;
        for _ in 0..MAX_GROW {
            let mut buf = vec![0u8; len];
            // SAFETY: open image, buffer of the given length.
            let ret = unsafe { ffi::rbd_get_id(self.handle, buf.as_mut_ptr().cast(), len) };
            if ret == -ERANGE {
                len *= 2;
                continue;
            }
            check(ret.into(), || self.what("rbd_get_id"))?;
            return Ok(from_buf(&buf));
        }
        Err(RbdError::from_errno(
            -(ERANGE as i64),
            self.what("rbd_get_id"),
        ))
    }

    /// Creation time, seconds since the epoch.
    pub fn created(&self) -> RbdResult<i64> {
        let mut ts = ffi::timespec::default();
        // SAFETY: open image, valid out struct.
        let ret = unsafe { ffi::rbd_get_create_timestamp(self.handle, &mut ts) };
        check(ret.into(), || self.what("rbd_get_create_timestamp"))?;
        Ok(ts.tv_sec)
    }

    /// Grows (or shrinks!) the image to `size` bytes.
    pub fn resize(&self, size: u64) -> RbdResult<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_resize(self.handle, size) };
        check(ret.into(), || {
            format!("rbd_resize {} to {size}", self.label)
        })
        .map(drop)
    }

    /// Turns features on (`enabled`) or off on an existing image.
    pub fn update_features(&self, features: u64, enabled: bool) -> RbdResult<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_update_features(self.handle, features, u8::from(enabled)) };
        check(ret.into(), || {
            format!("rbd_update_features {} {features:#x} {enabled}", self.label)
        })
        .map(drop)
    }

    pub fn snap_create(&self, snap: &str) -> RbdResult<()> {
        let what = || format!("rbd_snap_create {}@{snap}", self.label);
        let c = cstring(snap, what)?;
        // SAFETY: open image, NUL-terminated name.
        let ret = unsafe { ffi::rbd_snap_create(self.handle, c.as_ptr()) };
        check(ret.into(), what).map(drop)
    }

    /// The extents that hold data in the image as opened (at its snapshot,
    /// if opened at one), its parent's included: `rbd_diff_iterate2` from
    /// the beginning, exact (not widened to whole objects). Sorted by offset.
    pub fn allocated_extents(&self) -> RbdResult<Vec<(u64, u64)>> {
        /// Called by librbd for each extent, on this thread, in order.
        unsafe extern "C" fn collect(
            off: u64,
            len: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: `arg` is the Vec below, alive and borrowed by nothing
            // else during the call.
            let out = unsafe { &mut *(arg as *mut Vec<(u64, u64)>) };
            if exists != 0 {
                out.push((off, len as u64));
            }
            0
        }
        let what = || self.what("rbd_diff_iterate2");
        let size = self.size()?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        // SAFETY: open image; no from-snapshot (NULL); the callback and its
        // argument outlive the call, which does not keep them.
        let ret = unsafe {
            ffi::rbd_diff_iterate2(
                self.handle,
                std::ptr::null(),
                0,
                size,
                1,
                0,
                Some(collect),
                &mut out as *mut Vec<(u64, u64)> as *mut c_void,
            )
        };
        check(ret.into(), what)?;
        Ok(out)
    }

    /// Fills `buf` from `offset` of the image as opened (at its snapshot, if
    /// opened at one), parent included; returns the bytes read, fewer only
    /// at the image's end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> RbdResult<usize> {
        let what = || self.what("rbd_read");
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: open image; `rest` is valid for `rest.len()` bytes of
            // writes and outlives the call, which does not keep it.
            let ret = unsafe {
                ffi::rbd_read(
                    self.handle,
                    offset + done as u64,
                    rest.len(),
                    rest.as_mut_ptr() as *mut c_char,
                )
            };
            match check(ret as i64, what)? {
                0 => break,
                n => done += n as usize,
            }
        }
        Ok(done)
    }

    /// Removes a snapshot. With clone v2 children it moves to the trash
    /// namespace and goes away with the last child.
    pub fn snap_remove(&self, snap: &str) -> RbdResult<()> {
        let what = || format!("rbd_snap_remove {}@{snap}", self.label);
        let c = cstring(snap, what)?;
        // SAFETY: open image, NUL-terminated name.
        let ret = unsafe { ffi::rbd_snap_remove(self.handle, c.as_ptr()) };
        check(ret.into(), what).map(drop)
    }

    /// The image's snapshots in the user namespace (the ones made with
    /// [`Image::snap_create`] and not removed).
    pub fn user_snapshots(&self) -> RbdResult<Vec<SnapInfo>> {
        let mut all = self.snap_list()?;
        all.retain(|s| s.namespace == ffi::RBD_SNAP_NAMESPACE_TYPE_USER);
        Ok(all)
    }

    /// Every snapshot of the image, whatever its namespace: `rbd_snap_list`
    /// also returns removed snapshots still held by clone v2 children (in
    /// the trash namespace).
    pub fn snap_list(&self) -> RbdResult<Vec<SnapInfo>> {
        let what = || self.what("rbd_snap_list");
        let mut cap: c_int = 16;
        for _ in 0..MAX_GROW {
            // librbd writes one entry per snapshot plus a terminator whose
            // name is NULL, and rbd_snap_list_end frees names up to that
            // terminator. Zeroed entries keep that walk safe even where
            // librbd returns without writing anything (the image vanished).
            let mut snaps = vec![
                ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                };
                cap as usize
            ];
            let mut max = cap;
            // SAFETY: open image; `snaps` has `max` zeroed entries.
            let ret = unsafe { ffi::rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut max) };
            if ret == -ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            let n = check(ret.into(), what)? as usize;
            let mut out: Vec<SnapInfo> = snaps[..n.min(cap as usize)]
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    size: s.size,
                    // SAFETY: NUL-terminated string from librbd.
                    name: unsafe { owned(s.name) },
                    namespace: ffi::RBD_SNAP_NAMESPACE_TYPE_USER,
                })
                .collect();
            // SAFETY: the terminated list librbd filled, released once.
            unsafe { ffi::rbd_snap_list_end(snaps.as_mut_ptr()) };
            for s in &mut out {
                s.namespace = self.snap_namespace(s.id)?;
            }
            return Ok(out);
        }
        Err(RbdError::from_errno(-(ERANGE as i64), what()))
    }

    /// The id of snapshot `snap` (NotFound if absent).
    pub fn snap_id(&self, snap: &str) -> RbdResult<u64> {
        let what = || format!("rbd_snap_get_id {}@{snap}", self.label);
        let c = cstring(snap, what)?;
        let mut id = 0u64;
        // SAFETY: open image, NUL-terminated name, valid out pointer.
        let ret = unsafe { ffi::rbd_snap_get_id(self.handle, c.as_ptr(), &mut id) };
        check(ret.into(), what)?;
        Ok(id)
    }

    /// Creation time of snapshot `snap_id`, seconds since the epoch.
    pub fn snap_timestamp(&self, snap_id: u64) -> RbdResult<i64> {
        let mut ts = ffi::timespec::default();
        // SAFETY: open image, valid out struct.
        let ret = unsafe { ffi::rbd_snap_get_timestamp(self.handle, snap_id, &mut ts) };
        check(ret.into(), || {
            format!("rbd_snap_get_timestamp {} #{snap_id}", self.label)
        })?;
        Ok(ts.tv_sec)
    }

    /// The namespace (`ffi::RBD_SNAP_NAMESPACE_TYPE_*`) of snapshot `snap_id`.
    pub fn snap_namespace(&self, snap_id: u64) -> RbdResult<i32> {
        let mut ns: ffi::rbd_snap_namespace_type_t = 0;
        // SAFETY: open image, valid out pointer.
        let ret = unsafe { ffi::rbd_snap_get_namespace_type(self.handle, snap_id, &mut ns) };
        check(ret.into(), || {
            format!("rbd_snap_get_namespace_type {} #{snap_id}", self.label)
        })?;
        Ok(ns)
    }

    /// Points the handle at snapshot `snap_id` (any namespace).
    pub fn set_snap_by_id(&self, snap_id: u64) -> RbdResult<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_snap_set_by_id(self.handle, snap_id) };
        check(ret.into(), || {
            format!("rbd_snap_set_by_id {} #{snap_id}", self.label)
        })
        .map(drop)
    }

    /// Copies the parent's data into this clone and detaches it. Takes time
    /// proportional to the data (bounded by the op timeout per object).
    pub fn flatten(&self) -> RbdResult<()> {
        // SAFETY: open image.
        let ret = unsafe { ffi::rbd_flatten(self.handle) };
        check(ret.into(), || self.what("rbd_flatten")).map(drop)
    }

    /// Clients watching the image (a krbd mapping, an open read-write
    /// handle), as `addr` strings. A read-only handle watches nothing, so a
    /// handle opened with [`IoCtx::open_read_only`] does not see itself.
    pub fn watchers(&self) -> RbdResult<Vec<String>> {
        let what = || self.what("rbd_watchers_list");
        let mut cap: usize = 8;
        for _ in 0..MAX_GROW {
            let mut ws = vec![
                ffi::rbd_image_watcher_t {
                    addr: ptr::null_mut(),
                    id: 0,
                    cookie: 0,
                };
                cap
            ];
            let mut max = cap;
            // SAFETY: open image; `ws` holds `max` zeroed entries.
            let ret = unsafe { ffi::rbd_watchers_list(self.handle, ws.as_mut_ptr(), &mut max) };
            if ret == -ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            check(ret.into(), what)?;
            let n = max.min(cap);
            // SAFETY: the n entries librbd filled, released once.
            let out = unsafe {
                let out = ws[..n].iter().map(|w| owned(w.addr)).collect();
                ffi::rbd_watchers_list_cleanup(ws.as_mut_ptr(), n);
                out
            };
            return Ok(out);
        }
        Err(RbdError::from_errno(-(ERANGE as i64), what()))
    }

    /// The parent of the image (at the snapshot it is opened at), if any.
    pub fn parent(&self) -> RbdResult<Option<Parent>> {
        // SAFETY: all-zero (NULL pointers) is valid for both structs.
        let mut img: ffi::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        let mut snap: ffi::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image, valid out structs.
        let ret = unsafe { ffi::rbd_get_parent(self.handle, &mut img, &mut snap) };
        match check(ret.into(), || self.what("rbd_get_parent")) {
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // SAFETY: filled by librbd; released once right after copying.
        let parent = unsafe {
            let p = Parent {
                image: linked(&img),
                snap_id: snap.id,
                snap_name: owned(snap.name),
                snap_namespace: snap.namespace_type,
            };
            ffi::rbd_linked_image_spec_cleanup(&mut img);
            ffi::rbd_snap_spec_cleanup(&mut snap);
            p
        };
        Ok(Some(parent))
    }

    /// The clones of the snapshot this handle is opened at (open the parent
    /// with `open_read_only(name, Some(snap))`), in every pool the user can
    /// read.
    pub fn children(&self) -> RbdResult<Vec<LinkedImage>> {
        let what = || self.what("rbd_list_children3");
        let mut cap: usize = 16;
        for _ in 0..MAX_GROW {
            // SAFETY: all-zero (NULL pointers) is a valid spec.
            let mut specs: Vec<ffi::rbd_linked_image_spec_t> =
                (0..cap).map(|_| unsafe { std::mem::zeroed() }).collect();
            let mut max = cap;
            // SAFETY: open image; `specs` has `max` zeroed entries.
            let ret = unsafe { ffi::rbd_list_children3(self.handle, specs.as_mut_ptr(), &mut max) };
            if ret == -ERANGE {
                cap = max.max(cap * 2);
                continue;
            }
            check(ret.into(), what)?;
            let n = max.min(cap);
            // SAFETY: the n entries librbd filled, released once.
            let out = unsafe {
                let out = specs[..n].iter().map(|s| linked(s)).collect();
                ffi::rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n);
                out
            };
            return Ok(out);
        }
        Err(RbdError::from_errno(-(ERANGE as i64), what()))
    }

    /// Image metadata `key` (None when unset).
    pub fn metadata_get(&self, key: &str) -> RbdResult<Option<String>> {
        let what = || format!("rbd_metadata_get {} {key}", self.label);
        let c_key = cstring(key, what)?;
        let mut len: usize = 256;
        for _ in 0..MAX_GROW {
            let mut buf = vec![0u8; len];
            let mut val_len = len;
            // SAFETY: open image, NUL-terminated key, buffer of val_len bytes.
            let ret = unsafe {
                ffi::rbd_metadata_get(
                    self.handle,
                    c_key.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    &mut val_len,
                )
            };
            if ret == -ERANGE {
                len = val_len.max(len * 2);
                continue;
            }
            return match check(ret.into(), what) {
                Ok(_) => Ok(Some(from_buf(&buf[..val_len.min(len)]))),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            };
        }
        Err(RbdError::from_errno(-(ERANGE as i64), what()))
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> RbdResult<()> {
        let what = || format!("rbd_metadata_set {} {key}", self.label);
        let c_key = cstring(key, what)?;
        let c_val = cstring(value, what)?;
        // SAFETY: open image, NUL-terminated strings.
        let ret = unsafe { ffi::rbd_metadata_set(self.handle, c_key.as_ptr(), c_val.as_ptr()) };
        check(ret.into(), what).map(drop)
    }

    /// Removes metadata `key` (NotFound when unset).
    pub fn metadata_remove(&self, key: &str) -> RbdResult<()> {
        let what = || format!("rbd_metadata_remove {} {key}", self.label);
        let c_key = cstring(key, what)?;
        // SAFETY: open image, NUL-terminated key.
        let ret = unsafe { ffi::rbd_metadata_remove(self.handle, c_key.as_ptr()) };
        check(ret.into(), what).map(drop)
    }
}

/// Copies a linked image spec filled by librbd.
///
/// # Safety
/// String fields are NULL or NUL-terminated.
unsafe fn linked(s: &ffi::rbd_linked_image_spec_t) -> LinkedImage {
    LinkedImage {
        pool_id: s.pool_id,
        pool_name: owned(s.pool_name),
        pool_namespace: owned(s.pool_namespace),
        image_id: owned(s.image_id),
        image_name: owned(s.image_name),
        trash: s.trash,
    }
}

/// librbd's version (major, minor, extra), e.g. (1, 16, 0) for Ceph 16.
pub fn librbd_version() -> (i32, i32, i32) {
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: valid out pointers.
    unsafe { ffi::rbd_version(&mut a, &mut b, &mut c) };
    (a, b, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_and_zeroed() {
        let s = Secret::new("AQBsecretsecret==".to_string());
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let mut v = b"abc".to_vec();
        zero(&mut v);
        assert_eq!(v, [0, 0, 0]);
    }

    #[test]
    fn buffers_and_names() {
        assert_eq!(from_buf(b"abc\0def"), "abc");
        assert_eq!(from_buf(b"abc"), "abc");
        let e = cstring("a\0b", || "image name".into()).unwrap_err();
        assert!(matches!(e, RbdError::InvalidArgument { .. }));
        assert_eq!(std::mem::size_of::<ffi::rados_pool_stat_t>(), 16 * 8);
        assert_eq!(std::mem::size_of::<ffi::rbd_linked_image_spec_t>(), 48);
        assert_eq!(std::mem::size_of::<ffi::rbd_snap_spec_t>(), 24);
        assert_eq!(librbd_version().0, 1);
    }
}
