//! The inventory protocol: how a node's LVM agent tells the controller
//! what it holds, without being asked.
//!
//! The one place this protocol is written down.
//!
//! - **Epoch.** An agent process picks a random epoch when it starts. Its
//!   generations count within that epoch only; numbers from two epochs are
//!   never compared.
//! - **Generation.** The agent's in-memory copy of LVM (see
//!   `agent::State`) takes the next generation at every change: each of
//!   its own mutations, and each background report that found something
//!   changed outside the agent (an LV made or removed by hand, a size or
//!   tag changed, a pool's usage moved). A generation names the whole copy
//!   as it was then. Every mutation's reply carries the [`Stamp`] that
//!   includes it.
//! - **Transport.** `Watch` is an RPC of the agent API, and it is also
//!   served on its own connection without HTTP/2 ([`crate::lvm::wire`]),
//!   which the controller uses (one stream per node, always open: HTTP/2
//!   would cost five times the memory). Both carry the same messages.
//! - **Watch.** The controller opens `Watch` with its cursor (the epoch and
//!   generation it has applied, or none). The agent answers with:
//!   1. a *full* update (every LV of ours, each class's capacity, the
//!      configuration problems) when the cursor is empty, names another
//!      epoch, or is older than the changes the agent still remembers;
//!      otherwise a *delta* from the cursor (the LVs changed since, and
//!      those removed since);
//!   2. then, whenever the generation moves, one delta from the last one it
//!      sent (changes are coalesced: a delta carries the LVs as they are
//!      when it is sent, so it may already include later changes; its
//!      generation is the one it was read at);
//!   3. and a *heartbeat* (an update with no LV, no removal, the same
//!      generation) whenever nothing was sent for the period the
//!      controller asked for.
//!
//!   Every update carries each class's capacity and the problems as of its
//!   generation, so capacity never needs a call of its own.
//! - **Parts.** A receiver may ask for updates in parts of a few KiB (the
//!   controller asks for 1 KiB): the agent then sends an update with many
//!   LVs as several messages of the same epoch and generation, all but the
//!   last marked `more`, and the receiver applies them together once the
//!   last is in (`rpc::split_update`, `rpc::Parts`). A stream cut between
//!   parts applies nothing of that update. This keeps the receiver's
//!   per-stream read buffers at their initial size: they grow to the
//!   largest message seen and stay there, once per node.
//! - **Applying.** The receiver keeps per LV the generation it last learnt
//!   it at. A delta or full update at generation `g` changes an LV only if
//!   the receiver holds nothing newer for it (a mutation's reply stamped
//!   after `g`); a full update removes every LV it does not list, except
//!   those. So a reply and a stream that race each other converge on the
//!   newer truth, in either order. A delta of another epoch, or older than
//!   the last update applied, is refused: the receiver watches again from
//!   scratch.
//! - **Reconnect.** After a cut the controller opens `Watch` again with its
//!   cursor. The same agent process resumes from it; a restarted agent (a
//!   new epoch) sends a full update, which replaces the node's entries.
//! - **Silence.** A node whose stream has sent nothing (not even a
//!   heartbeat) for [`DOWN_AFTER_HEARTBEATS`] periods is *down*. The
//!   controller then knows the node's state as of its last update, and
//!   nothing newer: it may answer reads from it, must not place new
//!   volumes there, and must not conclude that a request's volume does not
//!   exist there (see the controller's liveness rule).

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;

use crate::lvm::agent::ClassCapacity;
use crate::lvm::error::Result;
use crate::lvm::report::Lv;

/// Heartbeats a stream may miss before its node is down.
pub const DOWN_AFTER_HEARTBEATS: u32 = 3;

/// The heartbeat period an agent accepts, at least and at most.
pub const HEARTBEAT_LIMITS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));

/// The point in an agent's history that includes a change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Stamp {
    pub epoch: String,
    pub generation: u64,
}

/// A mutation's result and the stamp that includes it.
#[derive(Debug, Clone)]
pub struct Stamped<T> {
    pub value: T,
    pub stamp: Stamp,
}

/// Where a receiver's copy of a node's inventory stands.
#[derive(Debug, Clone, Default)]
pub struct WatchRequest {
    /// None: send everything.
    pub cursor: Option<Stamp>,
    pub heartbeat: Duration,
}

/// One update of a node's inventory (see the module's docs).
#[derive(Debug, Clone, Default)]
pub struct Update {
    pub epoch: String,
    pub generation: u64,
    /// Replaces everything the receiver knows of the node.
    pub full: bool,
    /// New or changed LVs of ours, by device class (all of them, if full).
    pub lvs: Vec<(String, Lv)>,
    /// LVs gone since the cursor: (device class, LV name).
    pub removed: Vec<(String, String)>,
    /// Each configured class's capacity at this generation.
    pub classes: Vec<(String, ClassCapacity)>,
    pub problems: Vec<String>,
}

impl Update {
    pub fn stamp(&self) -> Stamp {
        Stamp {
            epoch: self.epoch.clone(),
            generation: self.generation,
        }
    }

    /// A heartbeat: nothing changed.
    pub fn is_heartbeat(&self) -> bool {
        !self.full && self.lvs.is_empty() && self.removed.is_empty()
    }
}

/// The updates of one watch, until the stream ends or fails.
pub type Updates = Pin<Box<dyn Stream<Item = Result<Update>> + Send>>;
