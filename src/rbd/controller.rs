//! RBD controller logic over in-process librbd (pooled connections, every
//! call on a blocking thread). Identity is in Ceph: the image name derives
//! from the request name, image metadata holds the request name, a digest
//! of the parameters and the source, so any controller can restart at any
//! time and a retried call finds what an earlier attempt made (the
//! protocol is in [`crate::core::ids`]).
//!
//! Snapshots are snapshots of hidden clones: a CSI snapshot of volume V is
//! image `ldsnap-<key>`, a clone v2 of V taken through a short-lived
//! snapshot of V, with one snapshot `csi` of its own. It lives on when V is
//! deleted and stays clonable (new clones need a parent snapshot by name,
//! which a snapshot left on a trashed V would not give). Images that still
//! have clone children when deleted go to the trash, so nothing in use is
//! lost.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::core::backend::{
    Capacity, ControllerBackend, CreateSnapshot, CreateVolume, Secrets, SnapshotInfo, Source,
    VolumeInfo,
};
use crate::core::blockmap::{self, BlockMap, Extent, Side, StopOnDrop, COMPARE_CHUNK};
use crate::core::capacity::Range;
use crate::core::periodic;
use crate::csi;
use crate::error::{Error, Result};
use crate::rbd::config::{Cluster, RbdConfig};
use crate::rbd::ffi;
use crate::rbd::ids::{
    self, Kind, RbdId, RbdKind, META_CREATED, META_NAME, META_PARAMS, META_SOURCE, SOURCE_KEY,
};
use crate::rbd::params::{
    CapacityParams, ConstrainedPool, PoolChoice, Pools, RbdParams, SnapshotParams,
    JSON_PARAMETER_KEYS, PARAMETER_KEYS, P_CLUSTER, P_TOPOLOGY_POOLS, SNAPSHOT_PARAMETER_KEYS,
};
use crate::rbd::{ConnectionPool, Credentials, ImageOptions, IoCtx, RbdError, RbdResult};

/// Volume context keys the node plugin reads.
pub(crate) const CTX_CLUSTER: &str = "clusterID";
pub(crate) const CTX_POOL: &str = "pool";
pub(crate) const CTX_IMAGE: &str = "imageName";
pub(crate) const CTX_MOUNTER: &str = "mounter";
pub(crate) use crate::core::node::CTX_MKFS_OPTIONS;

/// Image metadata: the accessible topology (JSON), for Get/List.
const META_TOPOLOGY: &str = "lodestone.v1.topology";
/// Volumes are sized in whole MiB.
const GRAIN: u64 = 1 << 20;
const DEFAULT_SIZE: u64 = 1 << 30;

/// When to flatten clones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlattenPolicy {
    /// From this clone-chain depth on, a new clone is flattened in the
    /// background.
    pub soft_depth: usize,
    /// From this depth on, the call returns only after flattening.
    pub hard_depth: usize,
}

impl Default for FlattenPolicy {
    fn default() -> Self {
        FlattenPolicy {
            soft_depth: 4,
            hard_depth: 8,
        }
    }
}

pub(crate) struct RbdController {
    config: RbdConfig,
    pool: Arc<ConnectionPool>,
    flatten: FlattenPolicy,
    /// Pools whose trash this process swept (see `purge_later`).
    swept: Mutex<HashSet<i64>>,
}

/// Where a new volume goes: pool, data pool and its accessible topology.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    pool: String,
    data_pool: Option<String>,
    topology: Option<BTreeMap<String, String>>,
    rule: &'static str,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether an image name is ours from this request: tagged with its name,
/// or (a crash between create and tagging) not tagged by us at all; the
/// name itself derives from the request name. An untagged clone carries the
/// metadata its parent had (clone copies image metadata), so a foreign name
/// whose key is not this image's key was inherited, not written for it;
/// only another name with the same key (a clash) is someone else's.
fn owned_by(kind: Kind, meta_name: &Option<String>, name: &str) -> bool {
    meta_name
        .as_deref()
        .is_none_or(|n| n == name || kind.key_for_name(n) != kind.key_for_name(name))
}

/// Whether this request's tag is on the image (not just inherited tags).
fn tagged_by(meta_name: &Option<String>, name: &str) -> bool {
    meta_name.as_deref() == Some(name)
}

/// What a blocking image lookup returns.
struct Found {
    size: u64,
    name: Option<String>,
    digest: Option<String>,
    source: Option<String>,
    topology: Option<String>,
    created: Option<i64>,
    /// For a snapshot's hidden image: its snapshot `csi` exists (the CSI
    /// snapshot can be restored). Always true for volumes.
    ready: bool,
}

/// Reads an image's size and identity metadata straight from its header
/// object (three small OSD reads; None if it is absent). It never opens the
/// image: an open is a dozen round trips and a librbd state machine, and
/// listings inspect images other clients may be deleting at that moment.
fn inspect(io: &IoCtx, image: &str) -> RbdResult<Option<Found>> {
    match read_header(io, image) {
        Err(e) if e.is_not_found() => Ok(None),
        r => r.map(Some),
    }
}

fn read_header(io: &IoCtx, image: &str) -> RbdResult<Found> {
    let id = io.image_id(image)?;
    let size = io.image_size_unopened(&id)?;
    let meta = io.metadata_unopened(&id, ids::META_PREFIX)?;
    let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let created = match get(META_CREATED).and_then(|t| t.parse().ok()) {
        Some(t) => Some(t),
        None => io.image_created_unopened(&id).ok(),
    };
    let ready = Kind::Snapshot.key_of_image(image).is_none()
        || io
            .snapshot_names_unopened(&id)?
            .iter()
            .any(|n| n == ids::SNAP_NAME);
    Ok(Found {
        ready,
        size,
        name: get(META_NAME),
        digest: get(META_PARAMS),
        source: get(META_SOURCE),
        topology: get(META_TOPOLOGY),
        created,
    })
}

/// Writes identity metadata onto an image in one OSD operation (see
/// [`IoCtx::metadata_set_unopened`]): only ever onto images no node has
/// mapped yet (a create's own new image or clone, a hidden snapshot clone).
fn tag(io: &IoCtx, image: &str, meta: &[(&str, String)]) -> RbdResult<()> {
    let pairs: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    crate::fail_point!("rbd.tag.before");
    io.metadata_set_unopened(&io.image_id(image)?, &pairs)?;
    crate::fail_point!("rbd.tag.after");
    Ok(())
}

fn ignore_missing(r: RbdResult<()>) -> RbdResult<()> {
    match r {
        Err(e) if e.is_not_found() => Ok(()),
        r => r,
    }
}

fn ignore_exists(r: RbdResult<()>) -> RbdResult<()> {
    match r {
        Err(RbdError::Exists { .. }) => Ok(()),
        r => r,
    }
}

/// Removes an image; one that still has snapshots with clone children (or
/// other snapshots) goes to the trash instead, where its children keep
/// working. An image in use (watched: mapped on a node, open elsewhere) is
/// Busy, and whatever fails, the image is then exactly as it was: still
/// under its name, out of the trash.
///
/// `rbd_remove` checks watchers, moves the image to the trash and removes
/// it from there; a client that maps it after the check makes the last
/// step fail, after which librbd restores it only on a best-effort basis.
/// So after a failure an image left in the trash by the removal is put
/// back. A clone is also checked for watchers before anything changes
/// (it is opened anyway, for its trashed ancestors). A removal that died
/// halfway (the process killed) is finished by the next call.
fn remove_or_trash(io: &IoCtx, image: &str) -> RbdResult<()> {
    let id = match io.image_id(image) {
        Ok(id) => id,
        Err(e) if e.is_not_found() => return finish_removal(io, image),
        Err(e) => return Err(e),
    };
    if !io.has_parent_unopened(&id)? {
        // Not a clone: no ancestors to purge, and rbd_remove validates the
        // removal itself (watchers, snapshots) before it moves the image to
        // the trash, so the read-only open below (about 5 ms) would only
        // repeat that check. A watcher arriving between its check and the
        // move is what restore_stranded undoes, as for a clone.
        return remove_checked(io, image, Vec::new());
    }
    let (parent, watchers) = match io.open_read_only(image, None) {
        // a read-only handle watches nothing: every watcher is someone else
        Ok(img) => (img.parent()?, img.watchers()?),
        Err(e) if e.is_not_found() => return finish_removal(io, image),
        Err(e) => return Err(e),
    };
    if !watchers.is_empty() {
        return Err(RbdError::Busy {
            what: format!(
                "image {}/{image} has {} watcher(s) ({})",
                io.pool(),
                watchers.len(),
                watchers.join(", ")
            ),
        });
    }
    let ancestors = trashed_ancestors(io, parent)?;
    remove_checked(io, image, ancestors)
}

/// `rbd_remove` of an image checked for watchers (by librbd or by us), then
/// the purge of the trashed `ancestors` it kept alive.
fn remove_checked(io: &IoCtx, image: &str, ancestors: Vec<(i64, String, String)>) -> RbdResult<()> {
    crate::fail_point!("rbd.trash.before_remove");
    match io.remove(image) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return finish_removal(io, image),
        Err(RbdError::NotEmpty { .. }) => {
            crate::fail_point!("rbd.trash.before_move");
            io.trash_move(image, Duration::ZERO)?;
            crate::fail_point!("rbd.trash.after_move");
            return Ok(());
        }
        Err(e) => {
            if let Err(r) = restore_stranded(io, image) {
                tracing::warn!(image = %image, error = %r, "cannot restore the image from the trash");
            }
            return Err(e);
        }
    }
    crate::fail_point!("rbd.trash.after_remove");
    purge_ancestors(io, ancestors);
    Ok(())
}

/// Ancestors of ours that waited in the trash for their last child (just
/// removed): gone for good now, unless another child still needs them.
fn purge_ancestors(io: &IoCtx, ancestors: Vec<(i64, String, String)>) {
    for (pool_id, id, name) in ancestors {
        crate::fail_point!("rbd.trash.before_purge");
        let r = io
            .cluster()
            .ioctx_by_id(pool_id)
            .and_then(|pio| pio.trash_remove(&id, true));
        match r {
            Ok(()) => tracing::info!(image = %name, "removed from the trash: no clone needs it"),
            Err(e) if e.is_not_found() => {}
            Err(_) => break,
        }
    }
}

/// A snapshot's hidden image that DeleteSnapshot moved to the trash: its
/// snapshot `csi` goes (into the trash namespace while restores still use
/// it), then the image with its trashed ancestors, unless clones still
/// need it: it then waits in the trash for its last child, whose removal
/// purges it ([`trashed_ancestors`]). Returns whether it is gone.
fn purge_trashed_snapshot(io: &IoCtx, id: &str) -> RbdResult<bool> {
    let img = match io.open_by_id(id) {
        Ok(img) => img,
        Err(e) if e.is_not_found() => return Ok(true),
        Err(e) => return Err(e),
    };
    ignore_missing(img.snap_remove(ids::SNAP_NAME))?;
    crate::fail_point!("rbd.snapshot.purge_after_snap_remove");
    let parent = img.parent()?;
    drop(img);
    let ancestors = trashed_ancestors(io, parent)?;
    match io.trash_remove(id, true) {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(true),
        Err(RbdError::NotEmpty { .. } | RbdError::Busy { .. }) => return Ok(false),
        Err(e) => return Err(e),
    }
    purge_ancestors(io, ancestors);
    Ok(true)
}

/// Purges every snapshot image of ours that DeleteSnapshot left in the
/// pool's trash (a controller that died before its purge ran); those that
/// restores still need stay. Returns how many went.
fn sweep_trashed_snapshots(io: &IoCtx) -> RbdResult<usize> {
    let mut purged = 0;
    for e in io.trash_list()? {
        if e.source != ffi::RBD_TRASH_IMAGE_SOURCE_USER
            || Kind::Snapshot.key_of_image(&e.name).is_none()
        {
            continue;
        }
        match purge_trashed_snapshot(io, &e.id) {
            Ok(true) => {
                tracing::info!(pool = %io.pool(), image = %e.name,
                    "purged a deleted snapshot's image from the trash");
                purged += 1;
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(pool = %io.pool(), image = %e.name, error = %err,
                "cannot purge a deleted snapshot's image from the trash yet"),
        }
    }
    Ok(purged)
}

/// The trash entries `rbd_remove` left for `image` (source REMOVING).
fn removing_entries(io: &IoCtx, image: &str) -> RbdResult<Vec<String>> {
    Ok(io
        .trash_list()?
        .into_iter()
        .filter(|e| e.name == image && e.source == ffi::RBD_TRASH_IMAGE_SOURCE_REMOVING)
        .map(|e| e.id)
        .collect())
}

/// After a failed `rbd_remove`: puts the image back under its name if the
/// removal left it in the trash.
fn restore_stranded(io: &IoCtx, image: &str) -> RbdResult<()> {
    match io.image_id(image) {
        Ok(_) => return Ok(()),
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    for id in removing_entries(io, image)? {
        io.trash_restore(&id, image)?;
        tracing::info!(image = %image, "restored from the trash after a failed removal");
    }
    Ok(())
}

/// The image is no longer under its name: if an earlier removal died with
/// it in the trash, finish that removal (or, if a client watches it by
/// now, put it back and report Busy).
fn finish_removal(io: &IoCtx, image: &str) -> RbdResult<()> {
    for id in removing_entries(io, image)? {
        match io.trash_remove(&id, true) {
            Ok(()) => tracing::info!(image = %image, "finished an interrupted removal"),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                if let Err(r) = io.trash_restore(&id, image) {
                    tracing::warn!(image = %image, error = %r, "cannot restore the image");
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The image's ancestors that are ours and in the trash, nearest first,
/// up to the first live one (which purges its own when it goes).
fn trashed_ancestors(
    io: &IoCtx,
    mut parent: Option<crate::rbd::Parent>,
) -> RbdResult<Vec<(i64, String, String)>> {
    let mut out = Vec::new();
    while let Some(p) = parent.take() {
        let ours = [Kind::Volume, Kind::Snapshot]
            .iter()
            .any(|k| k.key_of_image(&p.image.image_name).is_some());
        if !p.image.trash || !ours || out.len() >= 64 {
            break;
        }
        out.push((
            p.image.pool_id,
            p.image.image_id.clone(),
            p.image.image_name.clone(),
        ));
        let pio = io.cluster().ioctx_by_id(p.image.pool_id)?;
        let img = pio.open_by_id_read_only(&p.image.image_id)?;
        img.set_snap_by_id(p.snap_id)?;
        parent = img.parent()?;
    }
    Ok(out)
}

/// Clones `parent_io:parent@snap` to `io:child`, then settles it (see
/// [`settle_clone`]).
#[allow(clippy::too_many_arguments)]
fn clone_into(
    parent_io: &IoCtx,
    parent: &str,
    snap: &str,
    io: &IoCtx,
    child: &str,
    options: &ImageOptions,
    size: u64,
    policy: FlattenPolicy,
    must_flatten: bool,
) -> RbdResult<bool> {
    ignore_exists(parent_io.clone_image(parent, snap, io, child, options))?;
    crate::fail_point!("rbd.create.after_clone");
    settle_clone(io, child, Some(size), policy, must_flatten)
}

/// What every attempt of a create does to its clone, first or retried:
/// grows it to `grow_to` (when given and larger), then applies the flatten
/// rules: a copy across pools (`must_flatten`) or a chain at the hard depth
/// is flattened now; at the soft depth it returns true so the caller
/// flattens in the background. A clone already flattened is left alone.
fn settle_clone(
    io: &IoCtx,
    child: &str,
    grow_to: Option<u64>,
    policy: FlattenPolicy,
    must_flatten: bool,
) -> RbdResult<bool> {
    if let Some(size) = grow_to {
        let img = io.open(child)?;
        if img.size()? < size {
            img.resize(size)?;
            crate::fail_point!("rbd.create.after_resize");
        }
    }
    let depth = io.clone_depth(child)?;
    if depth > 0 && (must_flatten || depth >= policy.hard_depth) {
        crate::fail_point!("rbd.flatten.before");
        io.open(child)?.flatten()?;
        crate::fail_point!("rbd.flatten.after");
        return Ok(false);
    }
    Ok(depth >= policy.soft_depth)
}

/// The parts of `ceph df --format json` GetCapacity reads.
#[derive(Debug, Deserialize)]
struct Df {
    stats: DfStats,
    #[serde(default)]
    pools: Vec<DfPool>,
}

#[derive(Debug, Deserialize)]
struct DfStats {
    /// Raw bytes of every OSD; zero until a ceph-mgr has reported.
    total_bytes: u64,
}

#[derive(Debug, Deserialize)]
struct DfPool {
    name: String,
    stats: DfPoolStats,
}

#[derive(Debug, Deserialize)]
struct DfPoolStats {
    /// Bytes clients can still write to the pool.
    max_avail: u64,
}

/// Pool `pool`'s MAX AVAIL from the JSON of the `df` command, or why it is
/// not known.
fn pool_max_avail(json: &[u8], pool: &str) -> std::result::Result<u64, String> {
    let df: Df = serde_json::from_slice(json).map_err(|e| format!("unexpected `df` reply: {e}"))?;
    if df.stats.total_bytes == 0 {
        return Err(
            "Ceph has no usage statistics (no ceph-mgr has reported them; the \
                    monitors compute per-pool free space from what the mgr sends)"
                .into(),
        );
    }
    df.pools
        .iter()
        .find(|p| p.name == pool)
        .map(|p| p.stats.max_avail)
        .ok_or_else(|| format!("the usage statistics list no pool {pool} yet"))
}

/// The source of a restore or clone, found.
struct VolumeSource {
    id: RbdId,
    /// The name of its pool.
    pool: String,
    found: Found,
}

/// What the volume context tells the node plugin besides the image.
fn node_context(params: &RbdParams) -> Vec<(String, String)> {
    let mut context = Vec::new();
    if let Some(m) = params.mounter {
        context.push((CTX_MOUNTER.to_string(), m.as_str().to_string()));
    }
    if let Some(o) = &params.mkfs_options {
        context.push((CTX_MKFS_OPTIONS.to_string(), o.clone()));
    }
    context
}

/// A volume to create, everything decided before the blocking part: the
/// image, its size, what its metadata will say and where its data comes
/// from. [`NewVolume::make`] follows the protocol in [`crate::core::ids`]:
/// the image first, its metadata last.
struct NewVolume {
    name: String,
    key: String,
    image: String,
    size: u64,
    range: Range,
    digest: String,
    meta: Vec<(&'static str, String)>,
    topology: Option<String>,
    options: ImageOptions,
    /// The source's id and pool name.
    source: Option<(RbdId, String)>,
    /// The snapshot of a source volume a clone is taken from.
    temp_snap: String,
    policy: FlattenPolicy,
}

impl NewVolume {
    fn plan(
        req: &CreateVolume,
        params: &RbdParams,
        placement: &Placement,
        source: Option<&VolumeSource>,
        policy: FlattenPolicy,
    ) -> Result<NewVolume> {
        let mut digested = req.params.clone();
        if let Some(s) = source {
            digested.insert(SOURCE_KEY.to_string(), s.id.encode());
        }
        let digest = ids::params_digest(&digested);
        let size = Self::size(&req.range, source.map(|s| s.found.size))?;
        let key = Kind::Volume.key_for_name(&req.name);
        let topology = placement
            .topology
            .as_ref()
            .map(|t| serde_json::to_string(t).expect("map serializes"));
        let mut meta = vec![(META_NAME, req.name.clone()), (META_PARAMS, digest.clone())];
        if let Some(s) = source {
            meta.push((META_SOURCE, s.id.encode()));
        }
        if let Some(t) = &topology {
            meta.push((META_TOPOLOGY, t.clone()));
        }
        Ok(NewVolume {
            name: req.name.clone(),
            image: Kind::Volume.object_name(&key),
            temp_snap: ids::temp_name(&key),
            key,
            size,
            range: req.range,
            digest,
            meta,
            topology,
            options: ImageOptions {
                features: Some(params.features),
                order: None,
                data_pool: placement.data_pool.clone(),
            },
            source: source.map(|s| (s.id.clone(), s.pool.clone())),
            policy,
        })
    }

    /// The size to create: in the range, at least the source's size, by
    /// default the source's size or [`DEFAULT_SIZE`].
    fn size(range: &Range, source_size: Option<u64>) -> Result<u64> {
        let min = source_size.unwrap_or(0);
        if range.limit > 0 && min > range.limit {
            return Err(Error::OutOfRange(format!(
                "the source holds {min} bytes, more than limit_bytes {}",
                range.limit
            )));
        }
        range.pick(GRAIN, min, source_size.unwrap_or(DEFAULT_SIZE))
    }

    /// On a blocking thread: makes the image, or finds what an earlier
    /// attempt made and completes it. Returns the pool id, the image as it
    /// is, and whether it is to be flattened in the background.
    fn make(self, io: &IoCtx) -> RbdResult<(i64, Found, bool)> {
        if self.source.is_none() {
            if let Some(found) = self.create_blank(io)? {
                return Ok((io.pool_id(), found, false));
            }
        }
        let background = match inspect(io, &self.image)? {
            Some(found) => self.adopt(io, &found)?,
            None => self.create_new(io)?,
        };
        let found = self.finish(io)?;
        Ok((io.pool_id(), found, background))
    }

    /// A blank volume's fast path: create first, tag in one operation, and
    /// answer from what was written, without opening the image. None when
    /// the image exists (a retry or a clash, for [`Self::adopt`]).
    fn create_blank(&self, io: &IoCtx) -> RbdResult<Option<Found>> {
        match io.create(&self.image, self.size, &self.options) {
            Ok(()) => {}
            Err(RbdError::Exists { .. }) => return Ok(None),
            Err(e) => return Err(e),
        }
        crate::fail_point!("rbd.create.after_create");
        tag(io, &self.image, &self.meta)?;
        crate::fail_point!("rbd.create.after_tag");
        Ok(Some(Found {
            size: self.size,
            name: Some(self.name.clone()),
            digest: Some(self.digest.clone()),
            source: None,
            topology: self.topology.clone(),
            created: Some(now()),
            ready: true,
        }))
    }

    /// The image exists: it must be this request's (or untagged: an attempt
    /// that died before its metadata) with these parameters and an
    /// acceptable size; then the steps the first attempt may have missed.
    /// Returns whether to flatten in the background.
    fn adopt(&self, io: &IoCtx, found: &Found) -> RbdResult<bool> {
        let (name, image) = (&self.name, &self.image);
        if !owned_by(Kind::Volume, &found.name, name) {
            return Err(RbdError::Exists {
                what: format!("image {}/{image} belongs to another request", io.pool()),
            });
        }
        let tagged = tagged_by(&found.name, name);
        if tagged && found.digest.as_deref() != Some(self.digest.as_str()) {
            return Err(RbdError::Exists {
                what: format!("volume {name:?} exists with other parameters or source"),
            });
        }
        if !tagged && found.size < self.size {
            // An attempt that crashed between clone and resize (images are
            // tagged last).
            io.open(image)?.resize(self.size)?;
        } else if !self.range.accepts(found.size) {
            return Err(RbdError::Exists {
                what: format!(
                    "volume {name:?} exists with {} bytes, which this request does not accept",
                    found.size
                ),
            });
        }
        // A retry applies the same flatten rules as the first attempt,
        // which may have died before them.
        match &self.source {
            Some((_, src_pool)) => {
                settle_clone(io, image, None, self.policy, src_pool != io.pool())
            }
            None => Ok(false),
        }
    }

    /// No image yet: a blank one, or a clone of the source (through a
    /// snapshot of it when it is a volume). Returns whether to flatten in
    /// the background.
    fn create_new(&self, io: &IoCtx) -> RbdResult<bool> {
        let Some((sid, src_pool)) = &self.source else {
            io.create(&self.image, self.size, &self.options)?;
            crate::fail_point!("rbd.create.after_create");
            return Ok(false);
        };
        let parent_io = io.cluster().ioctx_by_id(sid.pool_id)?;
        let snap = match sid.kind {
            Kind::Snapshot => ids::SNAP_NAME,
            Kind::Volume => {
                let parent = parent_io.open(&sid.image())?;
                ignore_exists(parent.snap_create(&self.temp_snap))?;
                drop(parent);
                crate::fail_point!("rbd.create.after_source_snap");
                &self.temp_snap
            }
        };
        // Across pools the data is copied (clone, then flatten) so the
        // volume lives where it was placed.
        let must_flatten = src_pool != io.pool();
        clone_into(
            &parent_io,
            &sid.image(),
            snap,
            io,
            &self.image,
            &self.options,
            self.size,
            self.policy,
            must_flatten,
        )
    }

    /// The last steps: the metadata that makes the image this request's,
    /// then the removal of the source volume's snapshot (clone v2 keeps it
    /// in the trash namespace while the clone needs it).
    fn finish(&self, io: &IoCtx) -> RbdResult<Found> {
        tag(io, &self.image, &self.meta)?;
        crate::fail_point!("rbd.create.after_tag");
        if let Some((sid, _)) = self.source.as_ref().filter(|(s, _)| s.kind == Kind::Volume) {
            let parent_io = io.cluster().ioctx_by_id(sid.pool_id)?;
            ignore_missing(parent_io.open(&sid.image())?.snap_remove(&self.temp_snap))?;
        }
        inspect(io, &self.image)?.ok_or_else(|| RbdError::NotFound {
            what: format!("image {}/{} vanished after create", io.pool(), self.image),
        })
    }
}

/// A CSI snapshot to take: the hidden clone `ldsnap-<key>` of the source
/// volume, with its own snapshot `csi` made last (see [`crate::core::ids`]).
struct NewSnapshot {
    id: RbdId,
    name: String,
    digest: String,
    /// The source volume: its id and image.
    source_id: String,
    source_image: String,
    /// The source's snapshot the hidden clone is taken from.
    temp: String,
    policy: FlattenPolicy,
}

impl NewSnapshot {
    fn plan(req: &CreateSnapshot, src: &RbdId, policy: FlattenPolicy) -> NewSnapshot {
        let mut digested = req.params.clone();
        digested.insert(SOURCE_KEY.to_string(), src.encode());
        let key = Kind::Snapshot.key_for_name(&req.name);
        NewSnapshot {
            id: RbdId {
                kind: Kind::Snapshot,
                cluster: src.cluster.clone(),
                pool_id: src.pool_id,
                key: key.clone(),
            },
            name: req.name.clone(),
            digest: ids::params_digest(&digested),
            source_id: src.encode(),
            source_image: src.image(),
            temp: ids::temp_name(&key),
            policy,
        }
    }

    /// On a blocking thread: takes the snapshot, or finds what an earlier
    /// attempt made and completes it. Returns the hidden image as it is
    /// and whether it is to be flattened in the background.
    fn make(self, io: &IoCtx) -> RbdResult<(Found, bool)> {
        let hidden = self.id.image();
        let existing = inspect(io, &hidden)?;
        if let Some(found) = &existing {
            self.check(io, found)?;
        }
        let background = if existing.is_some() && self.is_complete(io)? {
            false
        } else {
            self.complete(io, existing.is_none())?
        };
        self.drop_temp(io)?;
        let found = inspect(io, &hidden)?.ok_or_else(|| RbdError::NotFound {
            what: format!("image {}/{hidden} vanished", io.pool()),
        })?;
        Ok((found, background))
    }

    /// An existing hidden image must be this request's (or untagged: an
    /// attempt that died before its metadata) from this source.
    fn check(&self, io: &IoCtx, found: &Found) -> RbdResult<()> {
        let name = &self.name;
        if !owned_by(Kind::Snapshot, &found.name, name) {
            return Err(RbdError::Exists {
                what: format!(
                    "image {}/{} belongs to another request",
                    io.pool(),
                    self.id.image()
                ),
            });
        }
        if tagged_by(&found.name, name) && found.digest.as_deref() != Some(self.digest.as_str()) {
            return Err(RbdError::Exists {
                what: format!("snapshot {name:?} exists with another source"),
            });
        }
        Ok(())
    }

    /// Whether the hidden image has its snapshot `csi`, made last.
    fn is_complete(&self, io: &IoCtx) -> RbdResult<bool> {
        Ok(io
            .open_read_only(&self.id.image(), None)?
            .user_snapshots()?
            .iter()
            .any(|s| s.name == ids::SNAP_NAME))
    }

    /// The steps up to `csi`, from the hidden clone on when it is not there
    /// (`fresh`), else from the flatten rules on. Returns whether to
    /// flatten in the background.
    fn complete(&self, io: &IoCtx, fresh: bool) -> RbdResult<bool> {
        let hidden = self.id.image();
        if fresh {
            let source = io.open(&self.source_image)?;
            ignore_exists(source.snap_create(&self.temp))?;
            drop(source);
            crate::fail_point!("rbd.snapshot.after_source_snap");
            let options = ImageOptions::default();
            ignore_exists(io.clone_image(&self.source_image, &self.temp, io, &hidden, &options))?;
            crate::fail_point!("rbd.snapshot.after_clone");
        }
        // First attempt or retry: the same flatten rules.
        let background = settle_clone(io, &hidden, None, self.policy, false)?;
        tag(
            io,
            &hidden,
            &[
                (META_NAME, self.name.clone()),
                (META_PARAMS, self.digest.clone()),
                (META_SOURCE, self.source_id.clone()),
                (META_CREATED, now().to_string()),
            ],
        )?;
        ignore_exists(io.open(&hidden)?.snap_create(ids::SNAP_NAME))?;
        crate::fail_point!("rbd.snapshot.after_snap");
        Ok(background)
    }

    /// The source's temporary snapshot goes (a retry after a crash may find
    /// it still there; the source itself may be gone by then).
    fn drop_temp(&self, io: &IoCtx) -> RbdResult<()> {
        match io.open(&self.source_image) {
            Ok(s) => ignore_missing(s.snap_remove(&self.temp)),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl RbdController {
    pub(crate) fn new(
        config: RbdConfig,
        pool: Arc<ConnectionPool>,
        flatten: FlattenPolicy,
    ) -> Self {
        RbdController {
            config,
            pool,
            flatten,
            swept: Mutex::default(),
        }
    }

    /// A well-formed id of a configured cluster (anything else names
    /// nothing that exists).
    fn known_id(&self, kind: Kind, id: &str) -> Option<(RbdId, &Cluster)> {
        let rid = RbdId::parse(kind, id)?;
        let cluster = self.config.cluster(&rid.cluster).ok()?;
        Some((rid, cluster))
    }

    fn creds(&self, cluster: &Cluster, secrets: &Secrets) -> Result<Credentials> {
        self.config.credentials(cluster, secrets)
    }

    /// The pool for a new volume: `pool`, or the first topology-constrained
    /// pool matching the preferred, then the requisite topologies; with a
    /// source, the source's pool when it is allowed (data gravity).
    fn place(
        &self,
        cluster: Option<&Cluster>,
        pools: &Pools,
        requirement: Option<&csi::TopologyRequirement>,
        source_pool: Option<&str>,
    ) -> Result<Placement> {
        let data_pool = pools.data_pool.clone();
        let (pools, default_pool) = match &pools.choice {
            PoolChoice::Constrained { pools, default } => (pools, default),
            PoolChoice::Plain(pool) => {
                return Self::place_plain(cluster, pool, data_pool, requirement)
            }
        };
        let placed = |p: &ConstrainedPool, rule| Placement {
            pool: p.pool_name.clone(),
            data_pool: p.data_pool.clone().or(data_pool.clone()),
            topology: Some(p.segments()),
            rule,
        };
        let (preferred, requisite) = match requirement {
            Some(r) => (r.preferred.as_slice(), r.requisite.as_slice()),
            None => (&[][..], &[][..]),
        };
        let allowed = |p: &ConstrainedPool| {
            (preferred.is_empty() && requisite.is_empty())
                || preferred.iter().chain(requisite).any(|t| p.matches(t))
        };
        if let Some(src) = source_pool {
            if let Some(p) = pools.iter().find(|p| p.pool_name == src && allowed(p)) {
                return Ok(placed(p, "source-locality"));
            }
        }
        for t in preferred {
            if let Some(p) = pools.iter().find(|p| p.matches(t)) {
                return Ok(placed(p, "preferred-topology"));
            }
        }
        for t in requisite {
            if let Some(p) = pools.iter().find(|p| p.matches(t)) {
                return Ok(placed(p, "requisite-topology"));
            }
        }
        if preferred.is_empty() && requisite.is_empty() {
            // No topology in the request: `pool` if given, else the first.
            return Ok(match default_pool {
                Some(pool) => Placement {
                    pool: pool.clone(),
                    data_pool,
                    topology: None,
                    rule: "pool",
                },
                None => placed(&pools[0], "first-pool"),
            });
        }
        Err(Error::ResourceExhausted(format!(
            "no pool of {P_TOPOLOGY_POOLS} lies in the requested topology"
        )))
    }

    /// A plain pool's volume is reachable from every node of the cluster:
    /// from any requisite topology its nodes can report, i.e. one in the
    /// cluster's topology keys; from no other.
    fn place_plain(
        cluster: Option<&Cluster>,
        pool: &str,
        data_pool: Option<String>,
        requirement: Option<&csi::TopologyRequirement>,
    ) -> Result<Placement> {
        let requisite = requirement.map(|r| r.requisite.as_slice()).unwrap_or(&[]);
        let reachable = |t: &csi::Topology| {
            t.segments
                .keys()
                .all(|k| cluster.is_none_or(|c| c.knows_topology_key(k)))
        };
        if !requisite.is_empty() && !requisite.iter().any(reachable) {
            return Err(Error::ResourceExhausted(format!(
                "no node of this cluster lies in the requested topology: the nodes report \
                 only the topology keys {} (the cluster's topologyKeys in the RBD config)",
                cluster
                    .map(|c| match &c.topology_keys {
                        Some(k) => k.join(", "),
                        None => crate::rbd::config::DEFAULT_TOPOLOGY_KEYS.join(", "),
                    })
                    .unwrap_or_default()
            )));
        }
        Ok(Placement {
            pool: pool.to_string(),
            data_pool,
            topology: None,
            rule: "pool",
        })
    }

    fn volume_info(id: &RbdId, pool: &str, f: &Found) -> VolumeInfo {
        let topology = f
            .topology
            .as_deref()
            .and_then(|t| serde_json::from_str::<BTreeMap<String, String>>(t).ok())
            .map(|t| vec![t])
            .unwrap_or_default();
        let source = f.source.as_deref().and_then(|s| {
            if RbdId::parse(Kind::Snapshot, s).is_some() {
                Some(Source::Snapshot(s.to_string()))
            } else {
                RbdId::parse(Kind::Volume, s).map(|_| Source::Volume(s.to_string()))
            }
        });
        VolumeInfo {
            id: id.encode(),
            capacity: f.size,
            topology,
            context: [
                (CTX_CLUSTER.to_string(), id.cluster.clone()),
                (CTX_POOL.to_string(), pool.to_string()),
                (CTX_IMAGE.to_string(), id.image()),
            ]
            .into(),
            abnormal: None,
            source,
        }
    }

    fn snapshot_info(id: &RbdId, f: &Found) -> SnapshotInfo {
        SnapshotInfo {
            id: id.encode(),
            source_volume_id: f.source.clone().unwrap_or_default(),
            size: f.size,
            created: f.created.unwrap_or(0),
            ready: f.ready,
        }
    }

    /// Flattens an image on a background task (the soft depth policy).
    fn flatten_later(&self, creds: Credentials, pool_id: i64, image: String) {
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let what = image.clone();
            let r = pool
                .run_background_by_id(&creds, pool_id, move |io| {
                    crate::fail_point!("rbd.flatten.background_before");
                    io.open(&image)?.flatten()?;
                    crate::fail_point!("rbd.flatten.background_after");
                    Ok(())
                })
                .await;
            match r {
                Ok(()) => tracing::info!(image = %what, "flattened in the background"),
                Err(e) => tracing::warn!(image = %what, error = %e, "background flatten failed"),
            }
        });
    }

    /// Purges a deleted snapshot's image from the trash on a background
    /// task (see [`purge_trashed_snapshot`]); the first time in this
    /// process for its pool, sweeps the pool's trash too.
    fn purge_later(&self, creds: Credentials, pool_id: i64, image_id: String, image: String) {
        let pool = self.pool.clone();
        let sweep = self.swept.lock().expect("swept poisoned").insert(pool_id);
        tokio::spawn(async move {
            let r = pool
                .run_background_by_id(&creds, pool_id, move |io| {
                    let gone = purge_trashed_snapshot(io, &image_id)?;
                    if sweep {
                        sweep_trashed_snapshots(io)?;
                    }
                    Ok(gone)
                })
                .await;
            match r {
                Ok(true) => tracing::info!(image = %image, "deleted snapshot's image purged"),
                Ok(false) => tracing::info!(image = %image,
                    "deleted snapshot's image waits in the trash for the restores that use it"),
                Err(e) => tracing::warn!(image = %image, error = %e,
                    "purging a deleted snapshot's image failed; the next sweep retries"),
            }
        });
    }

    /// Sweeps the trash of every listed pool now and every `every`: the
    /// images of snapshots deleted by a controller that died before it
    /// purged them.
    pub(crate) fn spawn_trash_sweep(self: &Arc<Self>, every: Duration) {
        periodic::spawn_every(self, every, |me: Arc<Self>| async move {
            me.sweep_listed_pools().await
        });
    }

    async fn sweep_listed_pools(&self) {
        for cluster in &self.config.clusters {
            let Ok(creds) = self.creds(cluster, &Secrets::default()) else {
                continue;
            };
            for name in &cluster.pools {
                let r = self.pool.run(&creds, name, sweep_trashed_snapshots).await;
                if let Err(e) = r {
                    tracing::warn!(cluster = %cluster.cluster_id, pool = %name, error = %e,
                        "cannot sweep the pool's trash");
                }
            }
        }
    }

    /// What pool `pool` can still take, in bytes, as Ceph computes it for
    /// `ceph df` (MAX AVAIL: the fullest OSD the pool's CRUSH rule uses,
    /// the full ratio, and replication or erasure coding taken into
    /// account). The monitors answer from statistics a ceph-mgr sends them;
    /// without any (no mgr ever ran) the figure is unknown and the call is
    /// UNAVAILABLE rather than a zero that would refuse every volume.
    async fn pool_max_avail(
        &self,
        cluster: &Cluster,
        creds: &Credentials,
        pool: &str,
    ) -> Result<u64> {
        let out = self
            .pool
            .run(creds, pool, |io| {
                io.cluster()
                    .mon_command(r#"{"prefix":"df","format":"json"}"#)
            })
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotFound(format!(
                    "pool {pool} does not exist in cluster {}",
                    cluster.cluster_id
                )))
            }
            Err(e) => {
                return Err(Error::Unavailable(format!(
                    "cannot read the usage of pool {pool} in cluster {}: {e}",
                    cluster.cluster_id
                )))
            }
        };
        pool_max_avail(&out, pool).map_err(|why| {
            Error::Unavailable(format!(
                "capacity of pool {pool} in cluster {} is unknown: {why}",
                cluster.cluster_id
            ))
        })
    }

    /// The source of a restore or clone: in the request's cluster, and
    /// existing; with its pool and size.
    async fn volume_source(
        &self,
        cluster: &Cluster,
        req: &CreateVolume,
    ) -> Result<Option<VolumeSource>> {
        let Some(source) = &req.source else {
            return Ok(None);
        };
        let (kind, sid, what) = match source {
            Source::Snapshot(id) => (Kind::Snapshot, id, "snapshot"),
            Source::Volume(id) => (Kind::Volume, id, "volume"),
        };
        let id = RbdId::parse(kind, sid)
            .filter(|p| p.cluster == cluster.cluster_id)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "source {what} {sid} does not exist in cluster {}",
                    cluster.cluster_id
                ))
            })?;
        let (pool, found) = self
            .lookup(&id, &req.secrets)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source {what} {sid} does not exist")))?;
        Ok(Some(VolumeSource { id, pool, found }))
    }

    /// Where a new volume goes (see [`Self::place`]): only ever into a pool
    /// the driver lists, so that List* see it.
    fn place_volume(
        &self,
        cluster: &Cluster,
        params: &RbdParams,
        req: &CreateVolume,
        source: Option<&VolumeSource>,
    ) -> Result<Placement> {
        let placement = self.place(
            Some(cluster),
            &params.pools,
            req.requirement.as_ref(),
            source.map(|s| s.pool.as_str()),
        )?;
        if !cluster.pools.is_empty() && !cluster.pools.contains(&placement.pool) {
            return Err(Error::InvalidArgument(format!(
                "pool {} is not among the pools of cluster {} in the driver's --rbd-config; \
                 add it there first (ListVolumes and ListSnapshots read only those pools)",
                placement.pool, cluster.cluster_id
            )));
        }
        Ok(placement)
    }

    /// An image of `kind` named by `id`, inspected (None if absent).
    async fn lookup(&self, id: &RbdId, secrets: &Secrets) -> Result<Option<(String, Found)>> {
        let cluster = self.config.cluster(&id.cluster)?;
        let creds = self.creds(cluster, secrets)?;
        let image = id.image();
        let r = self
            .pool
            .run_by_id(&creds, id.pool_id, move |io| {
                Ok(inspect(io, &image)?.map(|f| (io.pool().to_string(), f)))
            })
            .await;
        match r {
            // The pool itself is gone: so is the image.
            Err(e) if e.is_not_found() => Ok(None),
            r => Ok(r?),
        }
    }

    async fn list_kind(&self, kind: Kind) -> Result<Vec<(RbdId, String, Found)>> {
        let mut out = Vec::new();
        for cluster in &self.config.clusters {
            if cluster.pools.is_empty() {
                continue;
            }
            let creds = self.creds(cluster, &Secrets::default())?;
            for pool in &cluster.pools {
                let cid = cluster.cluster_id.clone();
                let found = self
                    .pool
                    .run(&creds, pool, move |io| {
                        let mut found = Vec::new();
                        for spec in io.list()? {
                            let Some(key) = kind.key_of_image(&spec.name) else {
                                continue;
                            };
                            if let Some(f) = inspect(io, &spec.name)? {
                                let id = RbdId {
                                    kind,
                                    cluster: cid.clone(),
                                    pool_id: io.pool_id(),
                                    key: key.to_string(),
                                };
                                found.push((id, io.pool().to_string(), f));
                            }
                        }
                        Ok(found)
                    })
                    .await?;
                out.extend(found);
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl ControllerBackend for RbdController {
    fn parameter_keys(&self) -> &'static [&'static str] {
        PARAMETER_KEYS
    }

    fn json_parameter_keys(&self) -> &'static [&'static str] {
        JSON_PARAMETER_KEYS
    }

    fn is_valid_id(&self, id: &str) -> bool {
        RbdId::parse(Kind::Volume, id).is_some()
    }

    fn not_ready(&self) -> Option<String> {
        None
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo> {
        let params = RbdParams::parse(&req.params)?;
        let cluster = self.config.cluster(&params.cluster_id)?;
        let creds = self.creds(cluster, &req.secrets)?;
        let source = self.volume_source(cluster, req).await?;
        let placement = self.place_volume(cluster, &params, req, source.as_ref())?;
        let new = NewVolume::plan(req, &params, &placement, source.as_ref(), self.flatten)?;
        tracing::info!(name = %req.name, pool = %placement.pool, rule = placement.rule,
            size = new.size, "placed volume");
        let key = new.key.clone();
        let (pool_id, found, background) = self
            .pool
            .run(&creds, &placement.pool, move |io| new.make(io))
            .await?;
        let id = RbdId {
            kind: Kind::Volume,
            cluster: cluster.cluster_id.clone(),
            pool_id,
            key,
        };
        if background {
            self.flatten_later(creds, pool_id, id.image());
        }
        let mut info = Self::volume_info(&id, &placement.pool, &found);
        info.context.extend(node_context(&params));
        Ok(info)
    }

    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        // What Ceph is asked, beside the `rbd_remove` a direct removal makes
        // (one blocking call for all of it; nothing else: no listing, no
        // metadata read):
        // * rbd.get_id + rbd.parent_get (two small object-class calls, no
        //   image open): the id finds the header, the parent says whether
        //   the image is a clone. A plain volume goes straight to
        //   rbd_remove, which validates watchers and snapshots itself
        //   before it moves the image to the trash.
        // * only for a clone: rbd_open_read_only + rbd_get_parent +
        //   rbd_watchers_list + rbd_close: which trashed ancestors this
        //   image kept alive (purged after it), and the watcher check
        //   before anything changes.
        // * only when the image is not found: rbd_trash_list (+
        //   rbd_trash_remove of each entry found), to finish a removal that
        //   died halfway (the image in the trash under source REMOVING).
        // * only when rbd_remove answers ENOTEMPTY (the image has clones):
        //   rbd_trash_move, so the clones keep their parent.
        // * only when rbd_remove fails otherwise (e.g. a watcher that came
        //   after librbd's check): rbd.get_id + rbd_trash_list (+
        //   rbd_trash_restore), to put back an image the failed removal
        //   left in the trash (librbd's own restore is best-effort).
        // * only for a clone whose parent waits in the trash: one read-only
        //   open of each such ancestor (for its own parent) and its
        //   rbd_trash_remove once its last child is gone.
        // The volume id names the pool (by id) and the image, so nothing
        // is looked up to find them.
        let Some((rid, cluster)) = self.known_id(Kind::Volume, id) else {
            return Ok(());
        };
        let creds = self.creds(cluster, secrets)?;
        let image = rid.image();
        let r = self
            .pool
            .run_by_id(&creds, rid.pool_id, move |io| remove_or_trash(io, &image))
            .await;
        match r {
            Err(e) if e.is_not_found() => Ok(()),
            Err(RbdError::Busy { what }) => Err(Error::FailedPrecondition(format!(
                "{what}: the image is in use (mapped on a node); unstage it first"
            ))),
            r => Ok(r?),
        }
    }

    async fn get_volume(&self, id: &str) -> Result<Option<VolumeInfo>> {
        let Some((rid, _)) = self.known_id(Kind::Volume, id) else {
            return Ok(None);
        };
        Ok(self
            .lookup(&rid, &Secrets::default())
            .await?
            .map(|(pool, f)| Self::volume_info(&rid, &pool, &f)))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out: Vec<VolumeInfo> = self
            .list_kind(Kind::Volume)
            .await?
            .iter()
            .map(|(id, pool, f)| Self::volume_info(id, pool, f))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn expand_volume(&self, id: &str, range: Range, secrets: &Secrets) -> Result<u64> {
        let (rid, cluster) = self
            .known_id(Kind::Volume, id)
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        let creds = self.creds(cluster, secrets)?;
        let image = rid.image();
        let r = self
            .pool
            .run_by_id(&creds, rid.pool_id, move |io| {
                let img = io.open(&image)?;
                let size = img.size()?;
                if size >= range.required {
                    return Ok(Ok(size));
                }
                let want = match range.pick(GRAIN, 0, size) {
                    Ok(w) => w,
                    Err(e) => return Ok(Err(e)),
                };
                img.resize(want)?;
                Ok(Ok(want))
            })
            .await;
        match r {
            Err(e) if e.is_not_found() => {
                Err(Error::NotFound(format!("volume {id} does not exist")))
            }
            r => r?,
        }
    }

    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&csi::Topology>,
    ) -> Result<Capacity> {
        let Some(params) = CapacityParams::parse(params)? else {
            // No StorageClass: what every configured cluster's listed pools
            // can take (pools of one cluster share their OSDs, so their
            // figures overlap: the largest counts, not the sum).
            let mut total = Capacity {
                minimum_volume: GRAIN,
                ..Capacity::default()
            };
            for cluster in &self.config.clusters {
                if cluster.pools.is_empty() {
                    continue;
                }
                let creds = self.creds(cluster, &Secrets::default())?;
                let mut best = 0;
                for pool in &cluster.pools {
                    best = best.max(self.pool_max_avail(cluster, &creds, pool).await?);
                }
                total.available = total.available.saturating_add(best);
                total.maximum_volume = total.maximum_volume.max(best);
            }
            return Ok(total);
        };
        let cluster = self.config.cluster(&params.cluster_id)?;
        let requirement = topology.map(|t| csi::TopologyRequirement {
            requisite: vec![t.clone()],
            preferred: vec![],
        });
        let placement = match self.place(Some(cluster), &params.pools, requirement.as_ref(), None) {
            Ok(p) => p,
            // No pool serves this topology: nothing available there.
            Err(Error::ResourceExhausted(_)) => return Ok(Capacity::default()),
            Err(e) => return Err(e),
        };
        let creds = self.creds(cluster, &Secrets::default())?;
        // Image data goes to the data pool when there is one.
        let data = placement.data_pool.as_deref().unwrap_or(&placement.pool);
        let avail = self.pool_max_avail(cluster, &creds, data).await?;
        Ok(Capacity {
            available: avail,
            maximum_volume: avail,
            minimum_volume: GRAIN,
        })
    }

    fn snapshot_parameter_keys(&self) -> &'static [&'static str] {
        SNAPSHOT_PARAMETER_KEYS
    }

    fn is_valid_snapshot_id(&self, id: &str) -> bool {
        RbdId::parse(Kind::Snapshot, id).is_some()
    }

    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotInfo> {
        let (src, cluster) = self
            .known_id(Kind::Volume, &req.source_volume_id)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "source volume {} does not exist",
                    req.source_volume_id
                ))
            })?;
        if let Some(c) = SnapshotParams::parse(&req.params).cluster_id {
            if c != src.cluster {
                return Err(Error::InvalidArgument(format!(
                    "{P_CLUSTER} {c} is not the source volume's cluster {}",
                    src.cluster
                )));
            }
        }
        let creds = self.creds(cluster, &req.secrets)?;
        let new = NewSnapshot::plan(req, &src, self.flatten);
        let id = new.id.clone();
        let r = self
            .pool
            .run_by_id(&creds, src.pool_id, move |io| new.make(io))
            .await;
        let (found, background) = match r {
            Err(e) if e.is_not_found() => {
                return Err(Error::NotFound(format!(
                    "source volume {} does not exist",
                    req.source_volume_id
                )))
            }
            r => r?,
        };
        if background {
            self.flatten_later(creds, id.pool_id, id.image());
        }
        Ok(Self::snapshot_info(&id, &found))
    }

    async fn delete_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()> {
        // What Ceph is asked before the answer: rbd.get_id (one small
        // object-class call) and rbd_trash_move of the hidden image (a few
        // ms). From then on nothing finds the snapshot by name: it is gone
        // for CSI. Its snapshot `csi` and the image itself (each a monitor
        // round trip, about 100 ms apiece) are removed right after, on a
        // background slot (`purge_trashed_snapshot`), as ceph-csi leaves
        // them to the mgr; a controller that dies first leaves the image
        // in the trash, and the sweep at the next start (and every ten
        // minutes, and at the first DeleteSnapshot in a pool) purges it.
        // Only when the image is not found: rbd_trash_list, to finish a
        // removal an older version left halfway.
        let Some((sid, cluster)) = self.known_id(Kind::Snapshot, id) else {
            return Ok(());
        };
        let creds = self.creds(cluster, secrets)?;
        let hidden = sid.image();
        let r = self
            .pool
            .run_by_id(&creds, sid.pool_id, move |io| {
                let image_id = match io.image_id(&hidden) {
                    Ok(i) => i,
                    Err(e) if e.is_not_found() => {
                        return finish_removal(io, &hidden).map(|()| None)
                    }
                    Err(e) => return Err(e),
                };
                match io.trash_move(&hidden, Duration::ZERO) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {
                        return finish_removal(io, &hidden).map(|()| None)
                    }
                    Err(e) => return Err(e),
                }
                crate::fail_point!("rbd.snapshot.after_trash_move");
                Ok(Some(image_id))
            })
            .await;
        match r {
            Err(e) if e.is_not_found() => Ok(()),
            Err(RbdError::Busy { what }) => Err(Error::Aborted(format!(
                "{what}: the snapshot's image is busy (a background flatten); retry"
            ))),
            Ok(Some(image_id)) => {
                self.purge_later(creds, sid.pool_id, image_id, sid.image());
                Ok(())
            }
            r => Ok(r.map(drop)?),
        }
    }

    async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>> {
        let Some((sid, _)) = self.known_id(Kind::Snapshot, id) else {
            return Ok(None);
        };
        Ok(self
            .lookup(&sid, &Secrets::default())
            .await?
            .map(|(_, f)| Self::snapshot_info(&sid, &f)))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out: Vec<SnapshotInfo> = self
            .list_kind(Kind::Snapshot)
            .await?
            .iter()
            .map(|(id, _, f)| Self::snapshot_info(id, f))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn serves_block_maps(&self) -> bool {
        true
    }

    /// librbd's diff of the snapshot image at its snapshot from the
    /// beginning, its parent (the source volume's point in time) included.
    async fn allocated(&self, snapshot_id: &str, secrets: &Secrets) -> Result<BlockMap> {
        let (sid, found, creds) = self.mapped_snapshot(snapshot_id, secrets).await?;
        let image = sid.image();
        let r = self
            .pool
            .run_by_id(&creds, sid.pool_id, move |io| {
                io.open_read_only(&image, Some(ids::SNAP_NAME))?
                    .allocated_extents()
            })
            .await;
        let extents = match r {
            Err(e) if e.is_not_found() => return Err(snapshot_missing(snapshot_id)),
            r => r?,
        };
        Ok(BlockMap::new(
            found.size,
            SECTOR,
            extents
                .into_iter()
                .map(|(offset, length)| Extent { offset, length }),
        ))
    }

    /// Computed, not tracked: each CSI snapshot here is an image of its
    /// own (a clone of the volume), and the librbd of Ceph 16 diffs an
    /// image only against an earlier snapshot of the same image, by name.
    /// So both snapshots are read where either holds data (librbd's
    /// allocated extents of each) and compared in 64 KiB chunks, on a
    /// background slot; the comparison stops when the caller goes away.
    async fn delta(&self, base: &str, target: &str, secrets: &Secrets) -> Result<BlockMap> {
        let (bid, bfound, _) = self.mapped_snapshot(base, secrets).await?;
        let (tid, tfound, creds) = self.mapped_snapshot(target, secrets).await?;
        if bfound.source.is_none() || bfound.source != tfound.source || bid.pool_id != tid.pool_id {
            return Err(Error::InvalidArgument(format!(
                "snapshots {base} and {target} are not of the same volume"
            )));
        }
        let (bimg, timg) = (bid.image(), tid.image());
        let (base_size, size) = (bfound.size, tfound.size);
        let stop = StopOnDrop::default();
        let stopped = stop.flag();
        let started = std::time::Instant::now();
        let r = self
            .pool
            .run_background_by_id(&creds, tid.pool_id, move |io| {
                let b = io.open_read_only(&bimg, Some(ids::SNAP_NAME))?;
                let t = io.open_read_only(&timg, Some(ids::SNAP_NAME))?;
                let mut ranges = b.allocated_extents()?;
                ranges.extend(t.allocated_extents()?);
                let ranges: Vec<Extent> = ranges
                    .into_iter()
                    .map(|(offset, length)| Extent { offset, length })
                    .collect();
                blockmap::differing_chunks(
                    &ranges,
                    base_size,
                    size,
                    |side, at, buf| {
                        let img = if side == Side::Base { &b } else { &t };
                        let n = img.read_at(at, buf)?;
                        buf[n..].fill(0);
                        Ok(())
                    },
                    || match stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        // Nobody reads this error: the caller is gone.
                        true => Err(RbdError::Busy {
                            what: "the delta's caller went away".into(),
                        }),
                        false => Ok(()),
                    },
                )
            })
            .await;
        let changed = match r {
            Err(e) if e.is_not_found() => {
                return Err(Error::NotFound(format!(
                    "snapshot {base} or {target} no longer exists"
                )))
            }
            r => r?,
        };
        let map = BlockMap::new(size, COMPARE_CHUNK, changed);
        tracing::info!(base, target, bytes = size, changed = map.bytes(),
            elapsed = ?started.elapsed(), "RBD delta computed by comparing both snapshots");
        drop(stop);
        Ok(map)
    }
}

fn snapshot_missing(id: &str) -> Error {
    Error::NotFound(format!("snapshot {id} does not exist"))
}

impl RbdController {
    /// A snapshot whose block map is asked for: it must exist and be ready.
    async fn mapped_snapshot(
        &self,
        snapshot_id: &str,
        secrets: &Secrets,
    ) -> Result<(RbdId, Found, Credentials)> {
        let (sid, cluster) = self
            .known_id(Kind::Snapshot, snapshot_id)
            .ok_or_else(|| snapshot_missing(snapshot_id))?;
        let (_, found) = self
            .lookup(&sid, secrets)
            .await?
            .ok_or_else(|| snapshot_missing(snapshot_id))?;
        if !found.ready {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {snapshot_id} is not ready to use yet"
            )));
        }
        let creds = self.creds(cluster, secrets)?;
        Ok((sid, found, creds))
    }
}

/// The unit RBD extents are aligned to at least.
const SECTOR: u64 = 512;

#[cfg(test)]
mod tests {
    use super::*;

    use crate::rbd::params::P_POOL;

    /// Places a volume with StorageClass parameters as given.
    fn place(
        c: &RbdController,
        cluster: Option<&Cluster>,
        params: &BTreeMap<String, String>,
        requirement: Option<&csi::TopologyRequirement>,
        source_pool: Option<&str>,
    ) -> Result<Placement> {
        c.place(cluster, &Pools::parse(params)?, requirement, source_pool)
    }

    fn topo(zone: &str) -> csi::Topology {
        csi::Topology {
            segments: [("topology.kubernetes.io/zone".to_string(), zone.to_string())].into(),
        }
    }

    #[test]
    fn places_by_topology_and_source() {
        let c = RbdController::new(
            RbdConfig::default(),
            unreachable_pool(),
            FlattenPolicy::default(),
        );
        let pools = r#"[
          {"poolName":"pa","domainSegments":[{"domainLabel":"topology.kubernetes.io/zone","value":"a"}]},
          {"poolName":"pb","domainSegments":[{"domainLabel":"topology.kubernetes.io/zone","value":"b"}]}]"#;
        let params: BTreeMap<String, String> =
            [(P_TOPOLOGY_POOLS.to_string(), pools.to_string())].into();
        let req = |pref: &[&str], reqs: &[&str]| csi::TopologyRequirement {
            preferred: pref.iter().map(|z| topo(z)).collect(),
            requisite: reqs.iter().map(|z| topo(z)).collect(),
        };
        let p = place(&c, None, &params, Some(&req(&["b"], &["a", "b"])), None).unwrap();
        assert_eq!((p.pool.as_str(), p.rule), ("pb", "preferred-topology"));
        let p = place(
            &c,
            None,
            &params,
            Some(&req(&["b"], &["a", "b"])),
            Some("pa"),
        )
        .unwrap();
        assert_eq!((p.pool.as_str(), p.rule), ("pa", "source-locality"));
        let p = place(&c, None, &params, Some(&req(&[], &["b"])), Some("pa")).unwrap();
        assert_eq!((p.pool.as_str(), p.rule), ("pb", "requisite-topology"));
        assert!(place(&c, None, &params, Some(&req(&[], &["c"])), None).is_err());
        let p = place(&c, None, &params, None, None).unwrap();
        assert_eq!(p.pool, "pa");
        let plain: BTreeMap<String, String> = [(P_POOL.to_string(), "rbd".to_string())].into();
        assert_eq!(place(&c, None, &plain, None, None).unwrap().topology, None);
        assert!(place(&c, None, &BTreeMap::new(), None, None).is_err());
    }

    /// A plain pool's volume is reachable from every node, so from any
    /// requisite topology in the keys the cluster's nodes report, and from
    /// no other: RESOURCE_EXHAUSTED (a valid topology that cannot be
    /// served), not a volume no node could use.
    #[test]
    fn plain_pool_honours_requisite_keys() {
        let c = RbdController::new(
            RbdConfig::default(),
            unreachable_pool(),
            FlattenPolicy::default(),
        );
        let cluster: Cluster =
            serde_json::from_str(r#"{"clusterID":"c","monitors":["m"]}"#).unwrap();
        let plain: BTreeMap<String, String> = [(P_POOL.to_string(), "rbd".to_string())].into();
        let garbage = csi::Topology {
            segments: [("example.com/garbage".to_string(), "nowhere".to_string())].into(),
        };
        let only = |ts: Vec<csi::Topology>| csi::TopologyRequirement {
            requisite: ts,
            preferred: vec![],
        };
        let r = place(
            &c,
            Some(&cluster),
            &plain,
            Some(&only(vec![garbage.clone()])),
            None,
        );
        assert!(matches!(r, Err(Error::ResourceExhausted(_))), "{r:?}");
        let p = place(
            &c,
            Some(&cluster),
            &plain,
            Some(&only(vec![garbage, topo("b")])),
            None,
        )
        .unwrap();
        assert_eq!((p.pool.as_str(), p.topology), ("rbd", None));
        assert!(place(&c, Some(&cluster), &plain, Some(&only(vec![])), None).is_ok());
    }

    /// MAX AVAIL comes from the pool's own entry of `df` (which includes
    /// replication and the full ratio), never from the raw free space; no
    /// statistics at all (no mgr) is an error, not zero.
    #[test]
    fn max_avail_from_df() {
        let df = br#"{"stats":{"total_bytes":3221225472,"total_avail_bytes":3000000000,
            "total_used_bytes":1,"total_used_raw_bytes":1,"total_used_raw_ratio":0,
            "num_osds":3,"num_per_pool_osds":3,"num_per_pool_omap_osds":3},
            "stats_by_class":{},
            "pools":[{"name":"rbd","id":1,"stats":{"stored":0,"objects":0,"kb_used":0,
            "bytes_used":0,"percent_used":0,"max_avail":950000000}},
            {"name":"ec","id":2,"stats":{"max_avail":1900000000}}]}"#;
        assert_eq!(pool_max_avail(df, "rbd"), Ok(950_000_000));
        assert_eq!(pool_max_avail(df, "ec"), Ok(1_900_000_000));
        assert!(pool_max_avail(df, "other")
            .unwrap_err()
            .contains("no pool other"));
        // what the monitors answer when no mgr ever reported
        let none = br#"{"stats":{"total_bytes":0,"total_avail_bytes":0,"total_used_bytes":0,
            "total_used_raw_bytes":0,"total_used_raw_ratio":0,"num_osds":0,
            "num_per_pool_osds":0,"num_per_pool_omap_osds":0},"stats_by_class":{},"pools":[]}"#;
        assert!(pool_max_avail(none, "rbd").unwrap_err().contains("mgr"));
        assert!(pool_max_avail(b"not json", "rbd").is_err());
    }

    fn unreachable_pool() -> Arc<ConnectionPool> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let p = Arc::new(ConnectionPool::new(
            Default::default(),
            Duration::from_secs(60),
        ));
        std::mem::forget(rt);
        p
    }
}
