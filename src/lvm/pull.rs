//! Cross-node restores: a new volume on one node filled from a snapshot on
//! another, agent to agent, with only the ranges that hold data on the wire.
//!
//! The controller decides (placement puts the restore elsewhere), then
//! asks the source node's agent for a *grant*: for [`GRANT_TTL`], the agent
//! of one named node may read one snapshot. The grant lives in the source
//! agent's memory; the controller renews it whenever it asks the target
//! about the copy, so a restarted source agent learns it again at the
//! next retry.
//!
//! The target's agent creates the LV tagged `copying` and `from=<node>`,
//! then reads the snapshot through the source agent's `Peer` service, over
//! mutual TLS with its own node certificate: the source checks that the
//! certificate names the granted node. The stream is a header, the pieces
//! (at most [`PIECE`] bytes each, from the snapshot's allocated ranges, in
//! order, chunks of zeroes left out), each with a checksum of its offset
//! and data (checked by the target before it writes the piece), then an end marker with the count of pieces and bytes: a stream
//! cut short is never taken for a whole one.
//!
//! Every [`CHECKPOINT_BYTES`] and `--copy-checkpoint-seconds` (both), the
//! target syncs what it wrote and records how far it got in an LV tag
//! (`copied=<offset>`):
//! below that offset the LV holds its final data. A copy interrupted by a
//! crash of either agent, a cut link or the controller's restart starts
//! again from that checkpoint, never from zero, and the LV stays tagged
//! `copying` (CreateVolume answers "in progress") until the end marker has
//! been checked and the data synced. What a thin target does not receive
//! reads as zeroes; a thick target zeroes its gaps itself (locally, nothing
//! on the wire).
//!
//! While a stream reads a snapshot, deleting the snapshot is refused with
//! FAILED_PRECONDITION (the snapshot is in use), and while a removal runs
//! no stream starts (ABORTED), so a stream never reads a snapshot being
//! zeroed or removed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::agentpb as pb;
use crate::agentpb::block_data::Kind as DataKind;
use crate::agentpb::peer_client::PeerClient;
use crate::config::DeviceClass;
use crate::core::blockmap::Extent;
use crate::host::blockdev;
use crate::lvm::agent::{LocalAgent, LvSpec, Pull};
use crate::lvm::copy::Job;
use crate::lvm::error::{LvmError, Result};
use crate::lvm::ids::{self, Kind, LvmKind, TAG_COPYING};
use crate::lvm::report::Lv;
use crate::lvm::rpc::{error_from_status, status_from_error};
use crate::tls::TlsMaterial;

/// How long a grant lets a node read a snapshot.
pub const GRANT_TTL: Duration = Duration::from_secs(15 * 60);
/// The most data one piece carries.
pub const PIECE: usize = 1 << 20;
/// A checkpoint (a sync and an lvchange) is recorded once this much data
/// arrived since the last and the agent's `--copy-checkpoint-seconds`
/// passed: its cost stays a small share of the copy at any link speed.
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// A stream that sends nothing for this long is given up (and resumed).
const SILENCE: Duration = Duration::from_secs(60);
const CONNECT: Duration = Duration::from_secs(10);

/// An agent's side of cross-node copies.
#[derive(Default)]
pub(crate) struct Peers {
    /// ("vg/lv", node) → until when that node may read that snapshot.
    grants: Mutex<BTreeMap<(String, String), Instant>>,
    /// Which LVs streams read and which are being removed: never both.
    reads: Arc<Mutex<Reads>>,
    /// This agent's certificate, to reach other agents.
    tls: OnceLock<TlsMaterial>,
}

#[derive(Default)]
struct Reads {
    /// "vg/lv" → the nodes streams read it for, one entry per stream.
    serving: BTreeMap<String, Vec<String>>,
    /// "vg/lv" of LVs being removed (zeroed first, when thick).
    removing: BTreeSet<String>,
}

impl Peers {
    fn begin_removal(&self, k: String) -> Result<Removal> {
        let mut r = self.reads.lock().expect("reads poisoned");
        if let Some(nodes) = r.serving.get(&k) {
            return Err(LvmError::InUse(format!(
                "{k} is being read by a restore on node {}; retry when it is done",
                nodes.join(", ")
            )));
        }
        if !r.removing.insert(k.clone()) {
            return Err(LvmError::Busy(format!("{k} is already being removed")));
        }
        Ok(Removal {
            reads: self.reads.clone(),
            key: k,
        })
    }
}

/// One stream's entry in [`Reads::serving`], removed when it ends.
struct Serving {
    reads: Arc<Mutex<Reads>>,
    key: String,
    node: String,
}

impl Serving {
    /// ABORTED while the LV is being removed.
    fn new(reads: &Arc<Mutex<Reads>>, key: String, node: String) -> Result<Self> {
        let mut r = reads.lock().expect("reads poisoned");
        if r.removing.contains(&key) {
            return Err(LvmError::Busy(format!("{key} is being removed")));
        }
        r.serving.entry(key.clone()).or_default().push(node.clone());
        Ok(Serving {
            reads: reads.clone(),
            key,
            node,
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let mut r = self.reads.lock().expect("reads poisoned");
        if let Some(nodes) = r.serving.get_mut(&self.key) {
            if let Some(i) = nodes.iter().position(|n| *n == self.node) {
                nodes.remove(i);
            }
            if nodes.is_empty() {
                r.serving.remove(&self.key);
            }
        }
    }
}

/// An LV's removal in progress: no stream starts reading it meanwhile.
pub(super) struct Removal {
    reads: Arc<Mutex<Reads>>,
    key: String,
}

impl Drop for Removal {
    fn drop(&mut self) {
        let mut r = self.reads.lock().expect("reads poisoned");
        r.removing.remove(&self.key);
    }
}

/// A piece's checksum: XXH3-128 of its data, seeded with its offset (so
/// the right bytes at the wrong place fail too). It guards the path from
/// the source's read to the target's write against mistakes; the link
/// itself is authenticated by TLS. XXH3 runs at memory speed, so the
/// checksum never limits the stream (SHA-256 without SHA extensions would,
/// on a 10 Gbit/s link).
pub fn piece_digest(offset: u64, data: &[u8]) -> Vec<u8> {
    xxhash_rust::xxh3::xxh3_128_with_seed(data, offset)
        .to_be_bytes()
        .to_vec()
}

/// The pieces of `extents` (in order), each at most [`PIECE`] bytes.
fn pieces(extents: impl Iterator<Item = Extent>) -> impl Iterator<Item = Extent> {
    extents.flat_map(|e| {
        (e.offset..e.end()).step_by(PIECE).map(move |o| Extent {
            offset: o,
            length: (PIECE as u64).min(e.end() - o),
        })
    })
}

fn key(vg: &str, lv: &str) -> String {
    format!("{vg}/{lv}")
}

impl LocalAgent {
    /// The certificate this agent shows other agents when it reads from
    /// them (its own node certificate).
    pub fn set_peer_tls(&self, tls: TlsMaterial) {
        let _ = self.peers.tls.set(tls);
    }

    /// Lets `node` read snapshot `lv` of `class` for [`GRANT_TTL`].
    pub(super) async fn grant_read(&self, class: &str, lv: &str, node: &str) -> Result<()> {
        if !crate::tls::valid_server_name(node) {
            return Err(LvmError::BadRequest(format!(
                "node name {node:?} cannot be checked against a certificate"
            )));
        }
        let vg = self.class(class)?.volume_group.clone();
        let found = self
            .lookup(&vg, lv)
            .await?
            .ok_or_else(|| LvmError::LvMissing(format!("snapshot {vg}/{lv} does not exist")))?;
        if Kind::Snapshot.key_of_lv(lv).is_none() {
            return Err(LvmError::BadRequest(format!(
                "{vg}/{lv} is not a snapshot: only snapshots are read by other nodes"
            )));
        }
        if ids::has_tag(&found.tags, TAG_COPYING) {
            return Err(LvmError::Busy(format!(
                "snapshot {vg}/{lv} is still being copied; retry when it is ready"
            )));
        }
        let now = Instant::now();
        let mut grants = self.peers.grants.lock().expect("grants poisoned");
        grants.retain(|_, until| *until > now);
        grants.insert((key(&vg, lv), node.to_string()), now + GRANT_TTL);
        Ok(())
    }

    /// Marks `lv` as being removed, until the returned guard drops:
    /// FAILED_PRECONDITION while another node's copy reads it, and no
    /// stream starts reading it meanwhile.
    pub(super) fn begin_removal(&self, lv: &Lv) -> Result<Removal> {
        self.peers.begin_removal(key(&lv.vg, &lv.name))
    }

    /// The data of snapshot `name` from `from` on, for the peer whose
    /// certificate `names` a node granted it: a header, the pieces, an end
    /// marker. PERMISSION_DENIED without a grant.
    pub(crate) async fn serve_blocks(
        &self,
        class: &str,
        name: &str,
        names: impl Fn(&str) -> bool,
        from: u64,
    ) -> Result<mpsc::Receiver<Result<pb::BlockData>>> {
        let cfg = self.class(class)?.clone();
        let vg = cfg.volume_group.clone();
        let k = key(&vg, name);
        let node = {
            let now = Instant::now();
            let grants = self.peers.grants.lock().expect("grants poisoned");
            grants
                .iter()
                .find(|((lv, node), until)| *lv == k && **until > now && names(node))
                .map(|((_, node), _)| node.clone())
        };
        let Some(node) = node else {
            tracing::warn!(lv = %k, "refused a read of a snapshot: no grant for this peer");
            return Err(LvmError::PermissionDenied(format!(
                "no grant lets this node read {k}"
            )));
        };
        let lv = self
            .lookup(&vg, name)
            .await?
            .ok_or_else(|| LvmError::LvMissing(format!("snapshot {k} does not exist")))?;
        // Registered before the map is read: a removal from here on is
        // refused, and one under way refuses this stream.
        let serving = Serving::new(&self.peers.reads, k.clone(), node.clone())?;
        let map = self.read_block_map(class, name, None).await?;
        if !lv.is_active() {
            self.activate(&vg, name).await?;
        }
        let extents: Vec<Extent> = map.starting_at(from).collect();
        let allocated = extents.iter().map(|e| e.length).sum();
        let dev = LocalAgent::device_path(&vg, name);
        let file = File::open(&dev)
            .map_err(|e| LvmError::Internal(format!("cannot open {}: {e}", dev.display())))?;
        let (tx, rx) = mpsc::channel(4);
        let header = pb::BlockData {
            kind: Some(DataKind::Header(pb::BlocksHeader {
                size: lv.size,
                allocated,
            })),
        };
        let _ = tx.send(Ok(header)).await;
        tracing::info!(lv = %k, to = %node, from, allocated, "serving a snapshot to another node");
        tokio::task::spawn_blocking(move || {
            let _serving = serving;
            let started = Instant::now();
            match send_pieces(&file, &dev, &extents, &tx, from > 0) {
                Ok(Some((pieces, bytes, wire))) => tracing::info!(lv = %k, to = %node, pieces,
                    bytes, wire, allocated, elapsed = ?started.elapsed(), "snapshot served"),
                Ok(None) => tracing::info!(lv = %k, to = %node, "the reader went away"),
                Err(e) => {
                    tracing::warn!(lv = %k, to = %node, error = %e, "serving the snapshot failed");
                    let _ = tx.blocking_send(Err(e));
                }
            }
        });
        Ok(rx)
    }

    /// A new LV filled from a snapshot on another node: created tagged
    /// `copying` and `from`, then the copy starts (see the module).
    pub(super) async fn create_pull(
        &self,
        class: &DeviceClass,
        spec: &LvSpec,
        pull: &Pull,
    ) -> Result<Lv> {
        let mut spec = spec.clone();
        for tag in [TAG_COPYING.to_string(), ids::from_tag(&pull.node)] {
            if !ids::has_tag(&spec.tags, &tag) {
                spec.tags.push(tag);
            }
        }
        let lv = self.create_blank(class, &spec).await?;
        crate::fail_point!("lvm.pull.after_target");
        self.start_copy(&lv, Job::Pull(pull.clone()), false, true)?;
        self.wait_copy(&lv, self.copy_wait).await;
        Ok(self.lookup(&lv.vg, &lv.name).await?.unwrap_or(lv))
    }

    /// The copy task of a cross-node restore, from the LV's checkpoint on.
    pub(super) async fn run_pull(
        &self,
        target: &Lv,
        pull: &Pull,
        done: &AtomicU64,
        cancel: &Arc<AtomicBool>,
    ) -> Result<()> {
        let lv = self
            .lookup(&target.vg, &target.name)
            .await?
            .ok_or_else(|| LvmError::LvMissing(format!("{}/{} is gone", target.vg, target.name)))?;
        let from = ids::tagged_copied(&lv.tags);
        done.store(from, Ordering::Relaxed);
        let mut stream = self.open_pull(pull, from).await?;
        let source = format!("node {} ({}/{})", pull.node, pull.class, pull.lv);
        let header = match recv(&mut stream, pull).await? {
            DataKind::Header(h) => h,
            _ => {
                return Err(LvmError::Internal(format!(
                    "the stream from {source} did not start with its header"
                )))
            }
        };
        if header.size > lv.size {
            return Err(LvmError::Internal(format!(
                "the snapshot on {source} holds {} bytes, more than {}/{} ({} bytes)",
                header.size, lv.vg, lv.name, lv.size
            )));
        }
        tracing::info!(lv = %lv.name, from = %source, resume_at = from,
            allocated = header.allocated, "copying from another node");

        let thin = lv.pool.is_some();
        let mut out = Writer::open(LocalAgent::device_path(&lv.vg, &lv.name)).await?;
        let mut pos = from;
        let mut last_end = 0u64;
        let mut checkpoint = from;
        let (mut pieces, mut bytes) = (0u64, 0u64);
        let mut since = Instant::now();
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(LvmError::Busy(format!(
                    "the copy into {}/{} was cancelled",
                    lv.vg, lv.name
                )));
            }
            let piece = match recv(&mut stream, pull).await? {
                DataKind::Piece(p) => p,
                DataKind::End(end) => {
                    if end.pieces != pieces || end.bytes != bytes {
                        return Err(LvmError::Internal(format!(
                            "{source} says it sent {} pieces ({} bytes); {pieces} ({bytes} \
                             bytes) arrived",
                            end.pieces, end.bytes
                        )));
                    }
                    break;
                }
                DataKind::Header(_) => {
                    return Err(LvmError::Internal(format!("{source} sent a second header")))
                }
            };
            let len = piece.data.len() as u64;
            if piece.offset < last_end || piece.offset + len > header.size {
                return Err(LvmError::Internal(format!(
                    "{source} sent a piece out of order or place ({}+{len})",
                    piece.offset
                )));
            }
            if !thin && piece.offset > pos {
                out.zero(pos, piece.offset - pos).await?;
            }
            last_end = piece.offset + len;
            out.write_checked(piece, &source).await?;
            pos = pos.max(last_end);
            pieces += 1;
            bytes += len;
            done.store(pos, Ordering::Relaxed);
            if pos - checkpoint >= CHECKPOINT_BYTES && since.elapsed() >= self.checkpoint_every {
                out.sync().await?;
                self.record_checkpoint(&lv, checkpoint, pos).await?;
                checkpoint = pos;
                since = Instant::now();
            }
        }
        if !thin && pos < lv.size {
            out.zero(pos, lv.size - pos).await?;
        }
        out.sync().await?;
        crate::fail_point!("lvm.pull.after_data");

        // Complete: one lvchange drops `copying` and the checkpoint.
        let mut stale = self::checkpoints(&lv, checkpoint);
        stale.push(TAG_COPYING.to_string());
        self.retag(&lv, &stale, None).await?;
        tracing::info!(lv = %lv.name, from = %source, resumed_at = from, pieces, bytes,
            "copy from another node complete");
        Ok(())
    }

    /// Opens the stream of the source's data from `from` on.
    async fn open_pull(&self, pull: &Pull, from: u64) -> Result<tonic::Streaming<pb::BlockData>> {
        let tls = self.peers.tls.get().cloned().ok_or_else(|| {
            LvmError::Unavailable(
                "this agent has no certificate to reach other nodes (it serves no agent API)"
                    .into(),
            )
        })?;
        let channel = crate::lvm::remote::agent_endpoint(&pull.node, &pull.address, CONNECT)
            .map_err(LvmError::BadRequest)?
            .connect_with_connector(tls.connector(&pull.node, CONNECT))
            .await
            .map_err(|e| {
                LvmError::Unavailable(format!(
                    "cannot reach the agent of node {} at {}: {e}",
                    pull.node, pull.address
                ))
            })?;
        let request = pb::ReadBlocksRequest {
            class: pull.class.clone(),
            name: pull.lv.clone(),
            from,
        };
        let stream = tokio::time::timeout(
            SILENCE,
            PeerClient::new(channel).read_blocks(Request::new(request)),
        )
        .await
        .map_err(|_| LvmError::Unavailable(format!("node {} did not start its stream", pull.node)))?
        .map_err(|s| source_error(&pull.node, s))?;
        Ok(stream.into_inner())
    }

    /// Records that everything below `to` is written (and synced).
    async fn record_checkpoint(&self, lv: &Lv, was: u64, to: u64) -> Result<()> {
        let old = self::checkpoints(lv, was);
        self.retag(lv, &old, Some(ids::copied_tag(to))).await?;
        tracing::info!(lv = %lv.name, offset = to, "copy checkpoint");
        crate::fail_point!("lvm.pull.after_checkpoint");
        Ok(())
    }

    /// One lvchange that drops the tags `del` and adds `add`; the cache
    /// follows.
    async fn retag(&self, lv: &Lv, del: &[String], add: Option<String>) -> Result<()> {
        let mut cmd = self.lvm("lvchange");
        for t in del {
            cmd = cmd.args(["--deltag", t]);
        }
        if let Some(t) = &add {
            cmd = cmd.args(["--addtag", t]);
        }
        self.runner
            .run(&cmd.arg(format!("{}/{}", lv.vg, lv.name)))
            .await
            .map_err(|e| {
                self.mark_dirty();
                LvmError::from(e)
            })?;
        self.update_lv(&lv.vg, &lv.name, |l| {
            l.tags.retain(|t| !del.contains(t));
            l.tags.extend(add.clone());
        });
        Ok(())
    }
}

/// The checkpoint tags `lv` may carry: those it was read with, and the one
/// for `last` written since.
fn checkpoints(lv: &Lv, last: u64) -> Vec<String> {
    ids::copied_tags(&lv.tags)
        .into_iter()
        .chain((last > 0).then(|| ids::copied_tag(last)))
        .collect()
}

/// The next message of the source's stream.
async fn recv(stream: &mut tonic::Streaming<pb::BlockData>, pull: &Pull) -> Result<DataKind> {
    match tokio::time::timeout(SILENCE, stream.message()).await {
        Err(_) => Err(LvmError::Unavailable(format!(
            "node {} sent nothing for {SILENCE:?}",
            pull.node
        ))),
        Ok(Err(s)) => Err(source_error(&pull.node, s)),
        Ok(Ok(None)) => Err(LvmError::Unavailable(format!(
            "the stream from node {} ended before its end marker",
            pull.node
        ))),
        Ok(Ok(Some(m))) => m
            .kind
            .ok_or_else(|| LvmError::Internal(format!("node {} sent an empty message", pull.node))),
    }
}

/// The source's refusal, for the copy: a snapshot that is gone (or that
/// the source will not serve) fails the copy for good.
fn source_error(node: &str, s: Status) -> LvmError {
    match error_from_status(node, s) {
        LvmError::LvMissing(m) | LvmError::NoSuchClass(m) => {
            LvmError::Blocked(format!("the source on node {node} is gone: {m}"))
        }
        e => e,
    }
}

/// Reads the pieces of `extents` from `dev` and sends those that hold
/// anything but zeroes. Some((pieces, bytes, bytes on the wire)), or None
/// when the reader went away. Blocking. (`resumed`: the stream starts at
/// a checkpoint; a fail point stops this process a few pieces into it.)
fn send_pieces(
    file: &File,
    dev: &Path,
    extents: &[Extent],
    tx: &mpsc::Sender<Result<pb::BlockData>>,
    resumed: bool,
) -> Result<Option<(u64, u64, u64)>> {
    use prost::Message;
    let zeroes = vec![0u8; PIECE];
    let (mut pieces, mut bytes, mut wire) = (0u64, 0u64, 0u64);
    for p in self::pieces(extents.iter().copied()) {
        let mut data = vec![0u8; p.length as usize];
        file.read_exact_at(&mut data, p.offset).map_err(|e| {
            LvmError::Internal(format!("read {} at {}: {e}", dev.display(), p.offset))
        })?;
        if data[..] == zeroes[..data.len()] {
            continue;
        }
        let msg = pb::BlockData {
            kind: Some(DataKind::Piece(pb::BlockPiece {
                offset: p.offset,
                checksum: piece_digest(p.offset, &data),
                data,
            })),
        };
        wire += msg.encoded_len() as u64;
        pieces += 1;
        bytes += p.length;
        if tx.blocking_send(Ok(msg)).is_err() {
            return Ok(None);
        }
        if resumed && pieces == 8 {
            crate::fail_point!("lvm.serve.resumed_stream");
        }
    }
    let end = pb::BlockData {
        kind: Some(DataKind::End(pb::BlocksEnd { pieces, bytes })),
    };
    wire += end.encoded_len() as u64;
    if tx.blocking_send(Ok(end)).is_err() {
        return Ok(None);
    }
    Ok(Some((pieces, bytes, wire)))
}

/// The target LV, opened exclusively (never while mounted), written from
/// blocking tasks. One piece is checked and written while the next one
/// arrives; zeroing, syncing and the end wait for it.
struct Writer {
    file: Arc<File>,
    path: PathBuf,
    pending: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl Writer {
    async fn open(path: PathBuf) -> Result<Writer> {
        let p = path.clone();
        let file = tokio::task::spawn_blocking(move || blockdev::open_exclusive(&p))
            .await
            .map_err(|e| LvmError::Internal(format!("open task failed: {e}")))??;
        Ok(Writer {
            file: Arc::new(file),
            path,
            pending: None,
        })
    }

    /// Waits for the piece being written.
    async fn settle(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(job) => job
                .await
                .map_err(|e| LvmError::Internal(format!("write task failed: {e}")))?,
            None => Ok(()),
        }
    }

    /// Checks `piece` against its checksum and writes it, in the
    /// background, after the piece before it is written.
    async fn write_checked(&mut self, piece: pb::BlockPiece, source: &str) -> Result<()> {
        let (file, path, source) = (self.file.clone(), self.path.clone(), source.to_string());
        self.settle().await?;
        self.pending = Some(tokio::task::spawn_blocking(move || {
            let offset = piece.offset;
            if piece_digest(offset, &piece.data) != piece.checksum {
                return Err(LvmError::Internal(format!(
                    "the piece at {offset} from {source} failed its checksum"
                )));
            }
            file.write_all_at(&piece.data, offset).map_err(|e| {
                LvmError::Internal(format!("write {} at {offset}: {e}", path.display()))
            })
        }));
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&File, &Path) -> std::result::Result<T, crate::error::Error> + Send + 'static,
    ) -> Result<T> {
        self.settle().await?;
        let (file, path) = (self.file.clone(), self.path.clone());
        Ok(tokio::task::spawn_blocking(move || f(&file, &path))
            .await
            .map_err(|e| LvmError::Internal(format!("write task failed: {e}")))??)
    }

    async fn zero(&mut self, offset: u64, len: u64) -> Result<()> {
        self.blocking(move |f, path| blockdev::zero_range(f, path, offset, len))
            .await
    }

    async fn sync(&mut self) -> Result<()> {
        self.blocking(|f, path| {
            f.sync_data()
                .map_err(|e| crate::error::Error::Internal(format!("sync {}: {e}", path.display())))
        })
        .await
    }
}

/// The `Peer` service: other agents read granted snapshots.
pub struct PeerService {
    pub agent: Arc<LocalAgent>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type ReadBlocksStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = std::result::Result<pb::BlockData, Status>> + Send>,
    >;

    async fn read_blocks(
        &self,
        r: Request<pb::ReadBlocksRequest>,
    ) -> std::result::Result<Response<Self::ReadBlocksStream>, Status> {
        use tokio_stream::StreamExt;
        let leaf = r
            .peer_certs()
            .and_then(|c| c.first().cloned())
            .ok_or_else(|| {
                Status::unauthenticated("reading a snapshot needs a node certificate")
            })?;
        let r = r.into_inner();
        let rx = self
            .agent
            .serve_blocks(
                &r.class,
                &r.name,
                move |node| crate::tls::cert_names(&leaf, node),
                r.from,
            )
            .await
            .map_err(status_from_error)?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(
            stream.map(|m| m.map_err(status_from_error)),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_ranges_and_keep_their_order() {
        let got: Vec<(u64, u64)> = pieces(
            [
                Extent {
                    offset: 0,
                    length: 64 << 10,
                },
                Extent {
                    offset: 4 << 20,
                    length: (2 << 20) + 4096,
                },
            ]
            .into_iter(),
        )
        .map(|e| (e.offset, e.length))
        .collect();
        assert_eq!(
            got,
            vec![
                (0, 64 << 10),
                (4 << 20, 1 << 20),
                (5 << 20, 1 << 20),
                (6 << 20, 4096)
            ]
        );
    }

    #[test]
    fn a_snapshot_is_never_read_and_removed_at_once() {
        let peers = Peers::default();
        let k = || "vg/ldsnap-x".to_string();
        let stream = Serving::new(&peers.reads, k(), "node-b".into()).unwrap();
        let e = peers.begin_removal(k()).err().expect("refused while read");
        assert!(
            matches!(e, LvmError::InUse(ref m) if m.contains("node-b")),
            "{e}"
        );
        drop(stream);
        let removal = peers.begin_removal(k()).unwrap();
        let e = Serving::new(&peers.reads, k(), "node-c".into()).err();
        assert!(matches!(e, Some(LvmError::Busy(_))));
        assert!(matches!(peers.begin_removal(k()), Err(LvmError::Busy(_))));
        drop(removal);
        assert!(Serving::new(&peers.reads, k(), "node-c".into()).is_ok());
    }

    #[test]
    fn a_checksum_covers_offset_and_data() {
        let d = piece_digest(4096, b"abc");
        assert_eq!(d.len(), 16);
        assert_ne!(d, piece_digest(8192, b"abc"));
        assert_ne!(d, piece_digest(4096, b"abd"));
        assert_eq!(d, piece_digest(4096, b"abc"));
    }

    #[test]
    fn each_stream_has_its_own_entry() {
        let reads = Arc::new(Mutex::new(Reads::default()));
        let a = Serving::new(&reads, "vg/s".into(), "n1".into()).unwrap();
        let b = Serving::new(&reads, "vg/s".into(), "n2".into()).unwrap();
        drop(a);
        assert_eq!(
            reads.lock().unwrap().serving["vg/s"],
            vec!["n2".to_string()]
        );
        drop(b);
        assert!(reads.lock().unwrap().serving.is_empty());
    }
}
