//! Raw declarations of the librados / librbd C functions the RBD backend uses
//! (Ceph 16.2 "pacific": `/usr/include/rados/librados.h`,
//! `/usr/include/rbd/librbd.h`). Nothing here is safe to call directly; the
//! safe layer is [`super::client`].
//!
//! The binary does not link librados / librbd: only the controller needs
//! them, and the node plugin (on every node) must not map them (nor
//! libceph-common, which they pull in). [`load`] opens `librbd.so.1` and
//! `librados.so.2` with `dlopen` the first time it is called (the controller
//! calls it at start, so a missing library is a clear start-up error) and
//! resolves every function below once into a table of typed pointers; the
//! functions of this module call through that table. The libraries stay
//! loaded for the life of the process (librados keeps threads and atexit
//! hooks, so they are never unloaded).
//!
//! Conventions of the C API, as the headers document them:
//! * every `int` / `int64_t` return is `>= 0` on success and `-errno` on
//!   failure;
//! * strings handed in are borrowed for the call only (librados/librbd copy
//!   what they keep);
//! * strings handed out in structs (`rbd_image_spec_t`,
//!   `rbd_linked_image_spec_t`, `rbd_snap_spec_t`, `rbd_snap_info_t`) are
//!   allocated by the library and must be released with the matching
//!   `*_cleanup` / `rbd_snap_list_end` call, never with Rust's allocator;
//! * fixed buffers (`rbd_get_id`, `rbd_metadata_get`) return `-ERANGE` when
//!   too short, some of them writing the needed length back.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_long, c_void, CStr};
use std::sync::OnceLock;

/// `rados_t`: a cluster handle. Thread-safe once connected.
pub type rados_t = *mut c_void;
/// `rados_ioctx_t`: a pool I/O context. Thread-safe as long as its settings
/// (snapshot/namespace/locator) are not changed concurrently; we never
/// change them.
pub type rados_ioctx_t = *mut c_void;
/// `rbd_image_t`: an open image.
pub type rbd_image_t = *mut c_void;
/// `rbd_image_options_t`: a bag of image-creation options.
pub type rbd_image_options_t = *mut c_void;

/// `struct rados_cluster_stat_t` (all sizes in KiB).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct rados_cluster_stat_t {
    pub kb: u64,
    pub kb_used: u64,
    pub kb_avail: u64,
    pub num_objects: u64,
}

/// `struct rados_pool_stat_t`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct rados_pool_stat_t {
    pub num_bytes: u64,
    pub num_kb: u64,
    pub num_objects: u64,
    pub num_object_clones: u64,
    pub num_object_copies: u64,
    pub num_objects_missing_on_primary: u64,
    pub num_objects_unfound: u64,
    pub num_objects_degraded: u64,
    pub num_rd: u64,
    pub num_rd_kb: u64,
    pub num_wr: u64,
    pub num_wr_kb: u64,
    pub num_user_bytes: u64,
    pub compressed_bytes_orig: u64,
    pub compressed_bytes: u64,
    pub compressed_bytes_alloc: u64,
}

pub const RBD_MAX_IMAGE_NAME_SIZE: usize = 96;
pub const RBD_MAX_BLOCK_NAME_SIZE: usize = 24;

/// `rbd_image_info_t` (filled by `rbd_stat`; the last three fields are
/// deprecated by librbd).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rbd_image_info_t {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; RBD_MAX_BLOCK_NAME_SIZE],
    pub parent_pool: i64,
    pub parent_name: [c_char; RBD_MAX_IMAGE_NAME_SIZE],
}

/// `rbd_image_spec_t`: strings owned by librbd (`rbd_image_spec_list_cleanup`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_image_spec_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
}

/// `rbd_linked_image_spec_t`: strings owned by librbd
/// (`rbd_linked_image_spec_cleanup` / `_list_cleanup`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_linked_image_spec_t {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

/// `rbd_snap_namespace_type_t` (a C enum: `int` sized).
pub type rbd_snap_namespace_type_t = c_int;
pub const RBD_SNAP_NAMESPACE_TYPE_USER: c_int = 0;
pub const RBD_SNAP_NAMESPACE_TYPE_GROUP: c_int = 1;
pub const RBD_SNAP_NAMESPACE_TYPE_TRASH: c_int = 2;
pub const RBD_SNAP_NAMESPACE_TYPE_MIRROR: c_int = 3;

/// `rbd_snap_spec_t`: `name` owned by librbd (`rbd_snap_spec_cleanup`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_snap_spec_t {
    pub id: u64,
    pub namespace_type: rbd_snap_namespace_type_t,
    pub name: *mut c_char,
}

/// `rbd_snap_info_t`: `rbd_snap_list` fills one per snapshot plus a
/// terminating entry whose `name` is NULL; `rbd_snap_list_end` frees the
/// names up to that terminator.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_snap_info_t {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_trash_image_source_t` (a C enum).
pub type rbd_trash_image_source_t = c_int;
pub const RBD_TRASH_IMAGE_SOURCE_USER: c_int = 0;
pub const RBD_TRASH_IMAGE_SOURCE_REMOVING: c_int = 3;
pub const RBD_TRASH_IMAGE_SOURCE_USER_PARENT: c_int = 4;

/// `rbd_trash_image_info_t`: strings owned by librbd
/// (`rbd_trash_list_cleanup`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_trash_image_info_t {
    pub id: *mut c_char,
    pub name: *mut c_char,
    pub source: rbd_trash_image_source_t,
    pub deletion_time: i64,
    pub deferment_end_time: i64,
}

/// `rbd_image_watcher_t`: `addr` owned by librbd
/// (`rbd_watchers_list_cleanup`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct rbd_image_watcher_t {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

/// `struct timespec` on 64-bit Linux (`time_t` and `long` are 64 bits).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct timespec {
    pub tv_sec: i64,
    pub tv_nsec: c_long,
}

// Image option keys (`RBD_IMAGE_OPTION_*`).
pub const RBD_IMAGE_OPTION_FORMAT: c_int = 0;
pub const RBD_IMAGE_OPTION_FEATURES: c_int = 1;
pub const RBD_IMAGE_OPTION_ORDER: c_int = 2;
pub const RBD_IMAGE_OPTION_STRIPE_UNIT: c_int = 3;
pub const RBD_IMAGE_OPTION_STRIPE_COUNT: c_int = 4;
pub const RBD_IMAGE_OPTION_FEATURES_SET: c_int = 8;
pub const RBD_IMAGE_OPTION_FEATURES_CLEAR: c_int = 9;
pub const RBD_IMAGE_OPTION_DATA_POOL: c_int = 10;
pub const RBD_IMAGE_OPTION_FLATTEN: c_int = 11;
pub const RBD_IMAGE_OPTION_CLONE_FORMAT: c_int = 12;

// Feature bits (`rbd/features.h`).
pub const RBD_FEATURE_LAYERING: u64 = 1 << 0;
pub const RBD_FEATURE_STRIPINGV2: u64 = 1 << 1;
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const RBD_FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const RBD_FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const RBD_FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
pub const RBD_FEATURE_JOURNALING: u64 = 1 << 6;
pub const RBD_FEATURE_DATA_POOL: u64 = 1 << 7;

/// The sonames opened by [`load`] (the runtime packages' names: librbd1,
/// librados2).
pub const LIBRBD: &CStr = c"librbd.so.1";
pub const LIBRADOS: &CStr = c"librados.so.2";

/// A `dlopen` handle, kept for the life of the process.
#[derive(Debug)]
struct Lib {
    name: &'static CStr,
    handle: *mut c_void,
}

/// The last `dlerror` text of this thread.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated thread-local string.
    let e = unsafe { nix::libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: checked non-NULL above; copied before any other dl call.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

impl Lib {
    /// Opens `name` (RTLD_NOW: every symbol bound now, not at first call).
    fn open(name: &'static CStr) -> Result<Lib, String> {
        // SAFETY: name is NUL-terminated; a library's initialisers run here.
        let handle = unsafe {
            nix::libc::dlopen(name.as_ptr(), nix::libc::RTLD_NOW | nix::libc::RTLD_LOCAL)
        };
        if handle.is_null() {
            return Err(format!(
                "cannot load {} (the RBD controller needs librbd and librados from Ceph's \
                 runtime packages, e.g. librbd1): {}",
                name.to_string_lossy(),
                dl_error()
            ));
        }
        Ok(Lib { name, handle })
    }

    /// The address of `symbol` (NUL-terminated) in this library.
    fn symbol(&self, symbol: &str) -> Result<*mut c_void, String> {
        let c = CStr::from_bytes_with_nul(symbol.as_bytes()).map_err(|e| e.to_string())?;
        // SAFETY: handle is a live dlopen handle, c is NUL-terminated.
        let p = unsafe { nix::libc::dlsym(self.handle, c.as_ptr()) };
        if p.is_null() {
            return Err(format!(
                "{} has no {} (Ceph older than 16.2 \"pacific\"?): {}",
                self.name.to_string_lossy(),
                symbol.trim_end_matches('\0'),
                dl_error()
            ));
        }
        Ok(p)
    }
}

/// Declares the C functions: one typed pointer per function in [`Api`],
/// resolved from the named library, and a module-level `unsafe fn` of the
/// same name and signature that calls through it.
macro_rules! ceph_api {
    ($($lib:ident { $(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)* })*) => {
        /// The resolved librados / librbd functions.
        pub struct Api {
            $($($name: unsafe extern "C" fn($($ty),*) $(-> $ret)?,)*)*
        }

        impl Api {
            fn resolve(libs: &Libs) -> Result<Api, String> {
                Ok(Api {
                    $($($name: {
                        let p = libs.$lib.symbol(concat!(stringify!($name), "\0"))?;
                        // SAFETY: the symbol is the C function of this name,
                        // declared with the signature of its header.
                        unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(p)
                        }
                    },)*)*
                })
            }
        }

        $($(
            /// The C function of this name (through the table [`load`] fills).
            ///
            /// # Safety
            /// The contract of the C function, as the module docs say.
            #[inline]
            #[allow(clippy::too_many_arguments)]
            pub unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller upholds the C function's contract.
                unsafe { (api().$name)($($arg),*) }
            }
        )*)*
    };
}

ceph_api! {
    rados {
        fn rados_create(cluster: *mut rados_t, id: *const c_char) -> c_int;
        fn rados_create2(
            cluster: *mut rados_t,
            clustername: *const c_char,
            name: *const c_char,
            flags: u64,
        ) -> c_int;
        fn rados_conf_set(cluster: rados_t, option: *const c_char, value: *const c_char) -> c_int;
        fn rados_connect(cluster: rados_t) -> c_int;
        fn rados_shutdown(cluster: rados_t);
        fn rados_cluster_stat(cluster: rados_t, result: *mut rados_cluster_stat_t) -> c_int;
        fn rados_mon_command(
            cluster: rados_t,
            cmd: *const *const c_char,
            cmdlen: usize,
            inbuf: *const c_char,
            inbuflen: usize,
            outbuf: *mut *mut c_char,
            outbuflen: *mut usize,
            outs: *mut *mut c_char,
            outslen: *mut usize,
        ) -> c_int;
        fn rados_buffer_free(buf: *mut c_char);
        fn rados_cluster_fsid(cluster: rados_t, buf: *mut c_char, len: usize) -> c_int;
        fn rados_pool_lookup(cluster: rados_t, pool_name: *const c_char) -> i64;
        fn rados_ioctx_create(
            cluster: rados_t,
            pool_name: *const c_char,
            ioctx: *mut rados_ioctx_t,
        ) -> c_int;
        fn rados_ioctx_create2(cluster: rados_t, pool_id: i64, ioctx: *mut rados_ioctx_t) -> c_int;
        fn rados_ioctx_destroy(io: rados_ioctx_t);
        fn rados_ioctx_get_id(io: rados_ioctx_t) -> i64;
        fn rados_ioctx_get_pool_name(io: rados_ioctx_t, buf: *mut c_char, maxlen: u32) -> c_int;
        fn rados_ioctx_pool_stat(io: rados_ioctx_t, stats: *mut rados_pool_stat_t) -> c_int;
        fn rados_exec(
            io: rados_ioctx_t,
            oid: *const c_char,
            cls: *const c_char,
            method: *const c_char,
            in_buf: *const c_char,
            in_len: usize,
            buf: *mut c_char,
            out_len: usize,
        ) -> c_int;
    }
    rbd {
        fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
        fn rbd_image_options_create(opts: *mut rbd_image_options_t);
        fn rbd_image_options_destroy(opts: rbd_image_options_t);
        fn rbd_image_options_set_string(
            opts: rbd_image_options_t,
            optname: c_int,
            optval: *const c_char,
        ) -> c_int;
        fn rbd_image_options_set_uint64(
            opts: rbd_image_options_t,
            optname: c_int,
            optval: u64,
        ) -> c_int;
        fn rbd_image_spec_list_cleanup(images: *mut rbd_image_spec_t, num_images: usize);
        fn rbd_linked_image_spec_cleanup(image: *mut rbd_linked_image_spec_t);
        fn rbd_linked_image_spec_list_cleanup(
            images: *mut rbd_linked_image_spec_t,
            num_images: usize,
        );
        fn rbd_snap_spec_cleanup(snap: *mut rbd_snap_spec_t);
        fn rbd_list2(io: rados_ioctx_t, images: *mut rbd_image_spec_t, max: *mut usize) -> c_int;
        fn rbd_create2(
            io: rados_ioctx_t,
            name: *const c_char,
            size: u64,
            features: u64,
            order: *mut c_int,
        ) -> c_int;
        fn rbd_create4(
            io: rados_ioctx_t,
            name: *const c_char,
            size: u64,
            opts: rbd_image_options_t,
        ) -> c_int;
        fn rbd_clone3(
            p_ioctx: rados_ioctx_t,
            p_name: *const c_char,
            p_snapname: *const c_char,
            c_ioctx: rados_ioctx_t,
            c_name: *const c_char,
            c_opts: rbd_image_options_t,
        ) -> c_int;
        fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
        fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
        fn rbd_trash_remove(io: rados_ioctx_t, id: *const c_char, force: bool) -> c_int;
        fn rbd_trash_list(
            io: rados_ioctx_t,
            entries: *mut rbd_trash_image_info_t,
            num_entries: *mut usize,
        ) -> c_int;
        fn rbd_trash_list_cleanup(entries: *mut rbd_trash_image_info_t, num_entries: usize);
        fn rbd_trash_restore(io: rados_ioctx_t, id: *const c_char, name: *const c_char) -> c_int;
        fn rbd_watchers_list(
            image: rbd_image_t,
            watchers: *mut rbd_image_watcher_t,
            max_watchers: *mut usize,
        ) -> c_int;
        fn rbd_watchers_list_cleanup(watchers: *mut rbd_image_watcher_t, num_watchers: usize);
        fn rbd_open(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        fn rbd_open_read_only(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        fn rbd_open_by_id_read_only(
            io: rados_ioctx_t,
            id: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        fn rbd_open_by_id(
            io: rados_ioctx_t,
            id: *const c_char,
            image: *mut rbd_image_t,
            snap_name: *const c_char,
        ) -> c_int;
        fn rbd_close(image: rbd_image_t) -> c_int;
        fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
        fn rbd_update_features(image: rbd_image_t, features: u64, enabled: u8) -> c_int;
        fn rbd_stat(image: rbd_image_t, info: *mut rbd_image_info_t, infosize: usize) -> c_int;
        fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
        fn rbd_get_features(image: rbd_image_t, features: *mut u64) -> c_int;
        fn rbd_get_id(image: rbd_image_t, id: *mut c_char, id_len: usize) -> c_int;
        fn rbd_get_create_timestamp(image: rbd_image_t, timestamp: *mut timespec) -> c_int;
        fn rbd_get_parent(
            image: rbd_image_t,
            parent_image: *mut rbd_linked_image_spec_t,
            parent_snap: *mut rbd_snap_spec_t,
        ) -> c_int;
        fn rbd_list_children3(
            image: rbd_image_t,
            images: *mut rbd_linked_image_spec_t,
            max_images: *mut usize,
        ) -> c_int;
        fn rbd_flatten(image: rbd_image_t) -> c_int;
        fn rbd_read(image: rbd_image_t, ofs: u64, len: usize, buf: *mut c_char) -> isize;
        fn rbd_diff_iterate2(
            image: rbd_image_t,
            fromsnapname: *const c_char,
            ofs: u64,
            len: u64,
            include_parent: u8,
            whole_object: u8,
            cb: Option<unsafe extern "C" fn(u64, usize, c_int, *mut c_void) -> c_int>,
            arg: *mut c_void,
        ) -> c_int;
        fn rbd_snap_list(image: rbd_image_t, snaps: *mut rbd_snap_info_t, max: *mut c_int) -> c_int;
        fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
        fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
        fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
        fn rbd_snap_get_id(image: rbd_image_t, snapname: *const c_char, snap_id: *mut u64) -> c_int;
        fn rbd_snap_get_timestamp(image: rbd_image_t, snap_id: u64, ts: *mut timespec) -> c_int;
        fn rbd_snap_set_by_id(image: rbd_image_t, snap_id: u64) -> c_int;
        fn rbd_snap_get_namespace_type(
            image: rbd_image_t,
            snap_id: u64,
            namespace_type: *mut rbd_snap_namespace_type_t,
        ) -> c_int;
        fn rbd_metadata_get(
            image: rbd_image_t,
            key: *const c_char,
            value: *mut c_char,
            val_len: *mut usize,
        ) -> c_int;
        fn rbd_metadata_set(image: rbd_image_t, key: *const c_char, value: *const c_char) -> c_int;
        fn rbd_metadata_remove(image: rbd_image_t, key: *const c_char) -> c_int;
    }
}

// SAFETY: the table holds only function pointers and dlopen handles, which
// any thread may use.
unsafe impl Send for Lib {}
unsafe impl Sync for Lib {}

/// The two libraries, by the names [`ceph_api!`] uses.
struct Libs {
    rados: Lib,
    rbd: Lib,
}

struct Loaded {
    api: Api,
    _libs: Libs,
}

static LOADED: OnceLock<Result<Loaded, String>> = OnceLock::new();

/// The loading thread's stack: room for the libraries' initialisers.
const LOAD_STACK: usize = 8 << 20;

fn open_and_resolve() -> Result<Loaded, String> {
    let libs = Libs {
        rados: Lib::open(LIBRADOS)?,
        rbd: Lib::open(LIBRBD)?,
    };
    let api = Api::resolve(&libs)?;
    Ok(Loaded { api, _libs: libs })
}

/// Loads librbd and librados and resolves every function, once per
/// process; later calls return the same table (or the same error).
///
/// The libraries are opened on a thread of their own that ends right
/// after: libceph-common's initialisers use about 1 MiB of the stack of the
/// thread that loads it (the main thread's grew by 940 KiB in a bare
/// `dlopen` of librados), which would otherwise stay resident in the
/// caller's stack for the life of the process.
pub fn load() -> Result<&'static Api, String> {
    LOADED
        .get_or_init(|| {
            std::thread::scope(|s| {
                std::thread::Builder::new()
                    .name("load-librbd".into())
                    .stack_size(LOAD_STACK)
                    .spawn_scoped(s, open_and_resolve)
                    .map_err(|e| format!("cannot start a thread to load librbd: {e}"))?
                    .join()
                    .map_err(|_| "loading librbd panicked".to_string())?
            })
        })
        .as_ref()
        .map(|l| &l.api)
        .map_err(Clone::clone)
}

/// Whether [`load`] has already opened the libraries in this process.
pub fn is_loaded() -> bool {
    matches!(LOADED.get(), Some(Ok(_)))
}

/// The table, loading it on first use. The controller calls [`load`] at
/// start and refuses to run without the libraries, so the panic is only
/// reachable from code that skipped that (tests, the bench).
fn api() -> &'static Api {
    match load() {
        Ok(api) => api,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = Lib::open(c"liblodestone-no-such-library.so.9")
            .expect_err("opened a library that does not exist");
        assert!(
            e.contains("cannot load liblodestone-no-such-library.so.9"),
            "{e}"
        );
        assert!(e.contains("librbd1"), "{e}");
    }

    #[test]
    fn a_missing_symbol_is_a_clear_error() {
        // The C library is always there; it has no rbd_open.
        let libc = Lib::open(c"libc.so.6").expect("libc");
        let e = libc.symbol("rbd_open\0").expect_err("libc has rbd_open?");
        assert!(e.contains("libc.so.6 has no rbd_open"), "{e}");
    }

    #[test]
    fn loads_librbd_and_resolves_every_function() {
        let api = load().expect("librbd and librados are installed where the tests run");
        let (mut major, mut minor, mut extra) = (0, 0, 0);
        // SAFETY: rbd_version only writes the three ints.
        unsafe { (api.rbd_version)(&mut major, &mut minor, &mut extra) };
        assert_eq!(major, 1, "librbd major version");
        assert!(is_loaded());
    }
}
