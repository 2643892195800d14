//! Full copies between LVs on one node: thick snapshots, and restores or
//! clones that cannot be thin snapshots (thick classes, or a class other
//! than the source's).
//!
//! A live source is cut first: a short-lived thin or COW snapshot
//! (`ldtmp-*`). The target LV is created next, tagged `copying`, and only
//! then does the call answer, so a snapshot reported as taken always has its
//! point in time, and a target whose cut is gone has lost it for good (the
//! failure is tagged in LVM and outlives restarts). A snapshot source is read
//! as it is. The copy writes every block that may hold data (zero chunks are
//! zeroed, or skipped on a thin target on its first pass only), checks that
//! a COW snapshot did not overflow, drops the tag, and only then removes the
//! cut (a COW one zeroed first: it holds the source's old blocks). The tag
//! lives in LVM, so after a crash the LV is still marked incomplete and the
//! next retry copies again from the same cut: a half copy is never reported
//! ready.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::config::DeviceClass;
use crate::error::Error;
use crate::host::blockdev;
use crate::lvm::agent::{LocalAgent, LvSpec, Origin, Pull};
use crate::lvm::error::{LvmError, Result};
use crate::lvm::ids::{self, Kind, LvmKind, TAG_COPYING, TAG_COPY_FAILED};
use crate::lvm::report::Lv;

/// A copy under way, or the last one that failed.
#[derive(Debug, Clone)]
pub(crate) enum CopyEntry {
    Running {
        done: Arc<AtomicU64>,
        total: u64,
        cancel: Arc<AtomicBool>,
        /// "vg/lv" the copy reads from.
        origin: String,
    },
    Failed {
        message: String,
        /// The point in time the copy stood for is lost (its temporary
        /// snapshot overflowed or vanished): retrying would copy a later
        /// state, so the copy stays failed until the LV is deleted.
        permanent: bool,
    },
}

/// Where a copy reads from: an LV of this node, or a snapshot of another
/// node (see [`crate::lvm::pull`]).
#[derive(Debug, Clone)]
pub(super) enum Job {
    Local(Origin),
    Pull(Pull),
}

/// Whether a failed copy would fail again however often it is retried: the
/// node refuses it until someone acts (its point in time is lost, its
/// source is gone), or a device it needs is held by someone else.
fn is_permanent(e: &LvmError) -> bool {
    matches!(
        e,
        LvmError::Blocked(_) | LvmError::InUse(_) | LvmError::Host(Error::FailedPrecondition(_))
    )
}

/// The temporary snapshot a copy into `target` reads from.
fn temp_for(target: &Lv) -> String {
    temp_for_name(&target.name)
}

fn temp_for_name(target: &str) -> String {
    ids::temp_lv_name(target.rsplit('-').next().unwrap_or(target))
}

fn key(vg: &str, lv: &str) -> String {
    format!("{vg}/{lv}")
}

/// COW space for freezing a thick volume during its copy: a quarter of it
/// (at least 64 MiB), or all of it after a first attempt overflowed.
fn cow_size(origin: u64, extent: u64, full: bool) -> u64 {
    let want = if full {
        origin
    } else {
        (origin / 4).max(64 << 20).min(origin)
    };
    crate::core::capacity::round_up(want, extent).unwrap_or(origin)
}

#[derive(Deserialize)]
struct LvsReport {
    report: Vec<LvsSection>,
}
#[derive(Deserialize)]
struct LvsSection {
    lv: Vec<LvsRow>,
}
#[derive(Deserialize)]
struct LvsRow {
    lv_attr: String,
    #[serde(default)]
    data_percent: String,
}

impl LocalAgent {
    /// Creates the target (tagged `copying`) and starts its copy.
    pub(super) async fn create_copy(
        &self,
        class: &DeviceClass,
        spec: &LvSpec,
        origin: &Origin,
    ) -> Result<Lv> {
        let mut spec = spec.clone();
        if !ids::has_tag(&spec.tags, TAG_COPYING) {
            spec.tags.push(TAG_COPYING.to_string());
        }
        // A live source is cut (its temporary snapshot taken) before the
        // target exists, and so before any answer: a snapshot reported as
        // taken, even not yet ready, stands for a point in time that exists,
        // and a copy target without its cut has lost it for good.
        if !origin.frozen {
            // The target is made next: its space is not the COW's to take.
            let reserve = if !class.is_thin() && self.origin_vg(origin)? == class.volume_group {
                spec.size
            } else {
                0
            };
            self.take_cut(&spec.name, origin, reserve).await?;
        }
        let lv = match self.create_blank(class, &spec).await {
            Ok(lv) => lv,
            Err(e) => {
                if !origin.frozen {
                    let (vg, temp) = self.temp_of(&spec.name, origin)?;
                    if let Err(rm) = self.remove_lv(&vg, &temp).await {
                        tracing::warn!(vg, lv = temp, error = %rm, "could not remove the cut");
                    }
                }
                return Err(e);
            }
        };
        crate::fail_point!("lvm.copy.after_target");
        self.start_copy(&lv, Job::Local(origin.clone()), spec.read_only, true)?;
        self.wait_copy(&lv, self.copy_wait).await;
        Ok(self.lookup(&lv.vg, &lv.name).await?.unwrap_or(lv))
    }

    /// The origin recorded in a copy target's tags.
    fn origin_of(&self, lv: &Lv) -> Result<Origin> {
        let src = ids::tagged_source(&lv.tags, crate::lvm::agent::Agent::node(self)).ok_or_else(
            || {
                LvmError::Internal(format!(
                    "{}/{} is marked copying but names no source",
                    lv.vg, lv.name
                ))
            },
        )?;
        Ok(Origin {
            lv: src.lv_name(),
            class: src.class,
            frozen: src.kind == Kind::Snapshot,
        })
    }

    pub(super) async fn resume_copy(
        &self,
        class: &str,
        name: &str,
        pull: Option<&Pull>,
    ) -> Result<Option<Lv>> {
        let class = self.class(class)?.clone();
        let Some(lv) = self.lookup(&class.volume_group, name).await? else {
            return Ok(None);
        };
        if let Some(from) = ids::tagged_from(&lv.tags) {
            // A copy from another node: it resumes from its checkpoint when
            // the controller says where the source is now.
            let incomplete =
                ids::has_tag(&lv.tags, TAG_COPYING) && !ids::has_tag(&lv.tags, TAG_COPY_FAILED);
            match pull {
                Some(p) if incomplete && p.node == from => {
                    self.start_copy(&lv, Job::Pull(p.clone()), false, false)?;
                    self.wait_copy(&lv, self.copy_wait).await;
                    return self.lookup(&lv.vg, &lv.name).await;
                }
                Some(p) if incomplete => {
                    return Err(LvmError::BadRequest(format!(
                        "{}/{} is copied from node {from}, not {}",
                        lv.vg, lv.name, p.node
                    )))
                }
                _ => return Ok(Some(lv)),
            }
        }
        if !ids::has_tag(&lv.tags, TAG_COPYING) {
            // Complete; a crash may have left its temporary snapshot behind.
            let temp = temp_for(&lv);
            if let Some(origin) = ids::tagged_source(&lv.tags, crate::lvm::agent::Agent::node(self))
            {
                let vg = self.class(&origin.class)?.volume_group.clone();
                if self.lookup(&vg, &temp).await?.is_some() {
                    self.remove_lv(&vg, &temp).await?;
                }
            }
            return Ok(Some(lv));
        }
        if ids::has_tag(&lv.tags, TAG_COPY_FAILED) {
            // Failed for good (recorded in LVM): never copied again.
            return Ok(Some(lv));
        }
        let origin = self.origin_of(&lv)?;
        let read_only = ids::has_tag(&lv.tags, Kind::Snapshot.tag());
        self.start_copy(&lv, Job::Local(origin), read_only, false)?;
        self.wait_copy(&lv, self.copy_wait).await;
        self.lookup(&lv.vg, &lv.name).await
    }

    /// Whether the copy into this LV failed for good.
    /// (A volume's failed copy is not: the volume is removed and the retry
    /// starts over.)
    pub(super) fn copy_failed_for_good(&self, vg: &str, name: &str) -> bool {
        Kind::Volume.key_of_lv(name).is_none()
            && matches!(
                self.copies
                    .lock()
                    .expect("copies poisoned")
                    .get(&key(vg, name)),
                Some(CopyEntry::Failed {
                    permanent: true,
                    ..
                })
            )
    }

    pub(super) fn describe_copy(&self, vg: &str, name: &str) -> Option<String> {
        let copies = self.copies.lock().expect("copies poisoned");
        match copies.get(&key(vg, name))? {
            CopyEntry::Running { done, total, .. } => {
                let done = done.load(Ordering::Relaxed);
                let pct = if *total == 0 {
                    0.0
                } else {
                    done as f64 * 100.0 / *total as f64
                };
                Some(format!("copying data: {pct:.0}% of {total} bytes done"))
            }
            CopyEntry::Failed {
                message,
                permanent: false,
            } => Some(format!(
                "the last copy attempt failed ({message}); retrying"
            )),
            CopyEntry::Failed {
                message,
                permanent: true,
            } if Kind::Volume.key_of_lv(name).is_some() => Some(format!(
                "the copy failed and cannot be resumed ({message}); the volume is removed and \
                 the next attempt starts over"
            )),
            CopyEntry::Failed {
                message,
                permanent: true,
            } => Some(format!(
                "the copy failed and cannot be resumed ({message}); delete it and create it again"
            )),
        }
    }

    /// Starts the copy task unless one is running for this target. `fresh`:
    /// the target was just created and never written (so a thin target reads
    /// zeroes where the source has zeroes); any later pass writes every
    /// block, so no block of an earlier pass survives.
    pub(super) fn start_copy(
        &self,
        target: &Lv,
        job: Job,
        read_only: bool,
        fresh: bool,
    ) -> Result<()> {
        let k = key(&target.vg, &target.name);
        let (done, cancel) = {
            let mut copies = self.copies.lock().expect("copies poisoned");
            match copies.get(&k) {
                Some(CopyEntry::Running { .. })
                | Some(CopyEntry::Failed {
                    permanent: true, ..
                }) => return Ok(()),
                _ => {}
            }
            let done = Arc::new(AtomicU64::new(0));
            let cancel = Arc::new(AtomicBool::new(false));
            let origin_key = match &job {
                Job::Local(origin) => match self.class(&origin.class) {
                    Ok(c) => key(&c.volume_group, &origin.lv),
                    Err(_) => String::new(),
                },
                Job::Pull(_) => String::new(),
            };
            copies.insert(
                k.clone(),
                CopyEntry::Running {
                    done: done.clone(),
                    total: target.size,
                    cancel: cancel.clone(),
                    origin: origin_key,
                },
            );
            (done, cancel)
        };
        let agent = self
            .me
            .upgrade()
            .ok_or_else(|| LvmError::Unavailable("shutting down".into()))?;
        let target = target.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = match &job {
                Job::Local(origin) => {
                    agent
                        .run_copy(&target, origin, read_only, fresh, &done, &cancel)
                        .await
                }
                Job::Pull(pull) => agent.run_pull(&target, pull, &done, &cancel).await,
            };
            let permanent =
                result.as_ref().is_err_and(is_permanent) && !cancel.load(Ordering::Relaxed);
            let volume = ids::has_tag(&target.tags, Kind::Volume.tag());
            if permanent && !volume {
                // Recorded in LVM, so that a restart does not copy a later
                // state under this snapshot's identity and creation time.
                if let Err(e) = agent.mark_copy_failed(&target).await {
                    tracing::warn!(lv = %k, error = %e, "could not tag the failed copy");
                }
            }
            {
                let mut copies = agent.copies.lock().expect("copies poisoned");
                match result {
                    Ok(()) => {
                        tracing::info!(lv = %k, elapsed = ?started.elapsed(), "copy complete");
                        copies.remove(&k);
                    }
                    Err(e) if cancel.load(Ordering::Relaxed) => {
                        tracing::info!(lv = %k, error = %e, "copy cancelled");
                        copies.remove(&k);
                    }
                    Err(e) => {
                        let permanent = is_permanent(&e);
                        tracing::warn!(lv = %k, error = %e, permanent, "copy failed");
                        copies.insert(
                            k.clone(),
                            CopyEntry::Failed {
                                message: e.to_string(),
                                permanent,
                            },
                        );
                    }
                }
            }
            // A restore or clone that failed for good was never reported
            // (CreateVolume answers only when it is complete), so nothing
            // would ever delete it: it goes now (zeroed when thick), and the
            // retry of the request starts over.
            if permanent && volume {
                let removed = match agent.class_of(&target).map(|c| c.name.clone()) {
                    Some(class) => crate::lvm::agent::Agent::remove(&*agent, &class, &target.name)
                        .await
                        .map(|_| ()),
                    None => Ok(()),
                };
                match removed {
                    Ok(()) => tracing::info!(lv = %k, "removed the volume whose copy failed"),
                    Err(e) => tracing::warn!(lv = %k, error = %e,
                        "could not remove the volume whose copy failed"),
                }
            }
        });
        Ok(())
    }

    /// Waits until the copy into `target` is no longer running, or `limit`.
    pub(super) async fn wait_copy(&self, target: &Lv, limit: Duration) {
        let k = key(&target.vg, &target.name);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let running = matches!(
                self.copies.lock().expect("copies poisoned").get(&k),
                Some(CopyEntry::Running { .. })
            );
            if !running {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asks a running copy into `lv` to stop: ABORTED until it has. Also
    /// ABORTED while a copy reads from `lv`.
    pub(super) fn cancel_copy(&self, lv: &Lv) -> Result<()> {
        let mut copies = self.copies.lock().expect("copies poisoned");
        let k = key(&lv.vg, &lv.name);
        let reader = copies.iter().find_map(|(target, e)| match e {
            CopyEntry::Running { origin, .. } if *origin == k => Some(target.clone()),
            _ => None,
        });
        if let Some(target) = reader {
            return Err(LvmError::Busy(format!(
                "{target} is being copied from {k}; retry when that copy is done"
            )));
        }
        match copies.get(&k) {
            Some(CopyEntry::Running { cancel, .. }) => {
                cancel.store(true, Ordering::Relaxed);
                Err(LvmError::Busy(format!(
                    "stopping the copy into {k} first; retry shortly"
                )))
            }
            Some(CopyEntry::Failed { .. }) => {
                copies.remove(&k);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// In the background after the start: removes (zeroing COW ones) the
    /// temporary snapshots no copy needs any more, left by a crash between a
    /// copy's last steps (its target complete, failed for good, or gone).
    pub(super) fn spawn_orphan_cleanup(&self) {
        let orphans: Vec<Lv> = self
            .lvs_named(ids::TEMP_PREFIX)
            .into_iter()
            .filter(|temp| {
                let key = &temp.name[ids::TEMP_PREFIX.len()..];
                let pending = [Kind::Volume, Kind::Snapshot].iter().any(|k| {
                    self.lvs_named(&k.lv_name(key)).iter().any(|t| {
                        ids::has_tag(&t.tags, TAG_COPYING)
                            && !ids::has_tag(&t.tags, TAG_COPY_FAILED)
                    })
                });
                !pending
            })
            .collect();
        if orphans.is_empty() {
            return;
        }
        let Some(agent) = self.me.upgrade() else {
            return;
        };
        let keys: Vec<String> = orphans.iter().map(|t| key(&t.vg, &t.name)).collect();
        self.removing
            .lock()
            .expect("removing poisoned")
            .extend(keys.iter().cloned());
        tokio::spawn(async move {
            for (temp, k) in orphans.into_iter().zip(keys) {
                tracing::info!(vg = %temp.vg, lv = %temp.name, "removing a temporary snapshot no copy needs");
                if let Err(e) = agent.remove_lv(&temp.vg, &temp.name).await {
                    tracing::warn!(vg = %temp.vg, lv = %temp.name, error = %e,
                        "could not remove a temporary snapshot");
                }
                agent.removing.lock().expect("removing poisoned").remove(&k);
            }
        });
    }

    /// Before a thick LV goes: the temporary COW snapshots of it (a copy
    /// not running, or left by a crash) are zeroed and removed first, since
    /// removing an origin would drop them unzeroed. Costs nothing when the
    /// VG holds no temporary COW snapshot (the usual case); else one `lvs`
    /// per such snapshot to learn its origin.
    pub(super) async fn remove_cuts_of(&self, origin: &Lv) -> Result<()> {
        let temps: Vec<Lv> = self
            .lvs_named(ids::TEMP_PREFIX)
            .into_iter()
            .filter(|t| t.vg == origin.vg && t.pool.is_none() && t.attr.starts_with('s'))
            .collect();
        for temp in temps {
            if self.is_being_removed(&temp.vg, &temp.name) {
                return Err(LvmError::Busy(format!(
                    "{}/{} is being removed; retry shortly",
                    temp.vg, temp.name
                )));
            }
            let cmd = self
                .lvm("lvs")
                .args(["--noheadings", "-o", "origin"])
                .arg(format!("{}/{}", temp.vg, temp.name));
            let of = match self.runner.run(&cmd).await.map_err(LvmError::from) {
                Ok(out) => out.stdout.trim().to_string(),
                Err(LvmError::LvMissing(_)) => continue,
                Err(e) => return Err(e),
            };
            if of == origin.name {
                self.remove_lv(&temp.vg, &temp.name).await?;
            }
        }
        Ok(())
    }

    fn is_being_removed(&self, vg: &str, lv: &str) -> bool {
        self.removing
            .lock()
            .expect("removing poisoned")
            .contains(&key(vg, lv))
    }

    /// Removes a temporary snapshot left for `target` by a failed copy.
    pub(super) async fn remove_temp_of(&self, target: &Lv) -> Result<()> {
        let temp = temp_for(target);
        for vg in self.config().volume_groups() {
            if self.lookup(&vg, &temp).await?.is_some() {
                self.remove_lv(&vg, &temp).await?;
            }
        }
        Ok(())
    }

    /// Removes a temporary snapshot. A thick (COW) one is zeroed first.
    async fn remove_lv(&self, vg: &str, name: &str) -> Result<()> {
        if let Some(lv) = self.lookup(vg, name).await? {
            if lv.pool.is_none() {
                self.zero_cow(&lv).await?;
            }
        }
        let cmd = self
            .lvm("lvremove")
            .arg("--yes")
            .arg(format!("{vg}/{name}"));
        let removed = self.runner.run(&cmd).await.map_err(LvmError::from);
        self.forget_zeroed(vg, name);
        match removed {
            Ok(_) | Err(LvmError::LvMissing(_)) => {
                self.forget(vg, name);
                Ok(())
            }
            Err(e) => {
                self.mark_dirty();
                Err(e)
            }
        }
    }

    /// A COW snapshot's exception store holds the origin's old blocks (every
    /// block written while it existed): volume data that must not reach the
    /// next LV given those extents. It is split from its origin (so no more
    /// blocks are copied into it), becoming a plain LV, and zeroed like any
    /// thick LV before removal.
    ///
    /// Cost, measured in the TCG guest: one more lvm process (`lvconvert
    /// --splitsnapshot`, about 2 s) and zeroing the COW size (about 80 MB/s:
    /// 3 s for 256 MiB), only when a copy of a live thick volume ends. Fully
    /// zeroing every new thick LV instead would put the same rate on every
    /// thick CreateVolume (13 s per GiB) and still return unzeroed extents to
    /// the VG.
    async fn zero_cow(&self, lv: &Lv) -> Result<()> {
        let mut lv = lv.clone();
        let path = format!("{}/{}", lv.vg, lv.name);
        if lv.attr.starts_with('s') {
            let cmd = self
                .lvm("lvconvert")
                .args(["--splitsnapshot", "--yes"])
                .arg(&path);
            self.runner.run(&cmd).await.map_err(|e| {
                self.mark_dirty();
                LvmError::from(e)
            })?;
            self.update_lv(&lv.vg, &lv.name, |l| l.attr.replace_range(0..1, "-"));
            lv.attr.replace_range(0..1, "-");
            crate::fail_point!("lvm.temp_remove.after_split");
        }
        // Temporary snapshots are made writable; one made read-only by an
        // earlier version is switched first.
        if lv.is_read_only() {
            let cmd = self.lvm("lvchange").args(["--permission", "rw"]).arg(&path);
            self.runner.run(&cmd).await.map_err(|e| {
                self.mark_dirty();
                LvmError::from(e)
            })?;
            self.update_lv(&lv.vg, &lv.name, |l| l.attr.replace_range(1..2, "w"));
        }
        if !lv.is_active() {
            self.activate(&lv.vg, &lv.name).await?;
        }
        self.zero(&lv).await?;
        crate::fail_point!("lvm.temp_remove.after_zero");
        Ok(())
    }

    /// Tags a copy target whose copy failed for good.
    async fn mark_copy_failed(&self, target: &Lv) -> Result<()> {
        let cmd = self
            .lvm("lvchange")
            .args(["--addtag", TAG_COPY_FAILED])
            .arg(format!("{}/{}", target.vg, target.name));
        self.runner.run(&cmd).await.map_err(|e| {
            self.mark_dirty();
            LvmError::from(e)
        })?;
        self.update_lv(&target.vg, &target.name, |lv| {
            if !ids::has_tag(&lv.tags, TAG_COPY_FAILED) {
                lv.tags.push(TAG_COPY_FAILED.to_string());
            }
        });
        Ok(())
    }

    fn origin_vg(&self, origin: &Origin) -> Result<String> {
        Ok(self.class(&origin.class)?.volume_group.clone())
    }

    /// VG and name of the temporary snapshot of a copy into `target`.
    fn temp_of(&self, target: &str, origin: &Origin) -> Result<(String, String)> {
        Ok((self.origin_vg(origin)?, temp_for_name(target)))
    }

    /// Takes the temporary snapshot a copy into `target` reads a live origin
    /// through, unless it exists: one left by an attempt that never answered
    /// (its target was not made yet) is as good a cut.
    /// `reserve`: bytes of the origin's VG the target still needs.
    async fn take_cut(&self, target: &str, origin: &Origin, reserve: u64) -> Result<()> {
        let origin_class = self.class(&origin.class)?.clone();
        let (vg, temp) = self.temp_of(target, origin)?;
        if self.is_being_removed(&vg, &temp) {
            return Err(LvmError::Busy(format!(
                "{vg}/{temp}, left by an earlier attempt, is being removed; retry shortly"
            )));
        }
        match self.lookup(&vg, &temp).await? {
            // Split from its origin by an interrupted removal: no cut at all.
            Some(left) if left.pool.is_none() && !left.attr.starts_with('s') => {
                self.remove_lv(&vg, &temp).await?;
            }
            Some(_) => return Ok(()),
            None => {}
        }
        let origin_lv = self.lookup(&vg, &origin.lv).await?.ok_or_else(|| {
            LvmError::LvMissing(format!("the source {vg}/{} no longer exists", origin.lv))
        })?;
        let cow = !origin_class.is_thin();
        let mut cmd = self
            .lvm("lvcreate")
            .args(["--snapshot", "--name", &temp, "--yes"]);
        let (size, attr) = if cow {
            // COW space for all of the volume when the VG has it, so the
            // snapshot cannot overflow; else a quarter of it. Writable, so
            // that it can be zeroed before removal.
            let cap = self.capacity_now(&origin_class)?;
            let full = cap.available >= origin_lv.size.saturating_add(reserve);
            let size = cow_size(origin_lv.size, cap.extent_size, full);
            cmd = cmd.args(["--size", &format!("{size}b")]);
            (size, "swi-a-s---")
        } else {
            cmd = cmd.args([
                "--permission",
                "r",
                "--setactivationskip",
                "n",
                "--activate",
                "y",
            ]);
            (origin_lv.size, "Vri-a-tz--")
        };
        self.runner
            .run(&cmd.arg(format!("{vg}/{}", origin_lv.name)))
            .await
            .map_err(|e| {
                self.mark_dirty();
                LvmError::from(e)
            })?;
        self.remember(
            &origin_class,
            Lv {
                vg: vg.clone(),
                name: temp,
                size,
                attr: attr.to_string(),
                tags: Vec::new(),
                pool: origin_class.thin_pool.clone(),
                data_percent: Some(0.0),
                metadata_percent: None,
                when_full: String::new(),
                zeroing: false,
                created: None,
            },
        );
        crate::fail_point!("lvm.copy.after_temp_snapshot");
        Ok(())
    }

    async fn run_copy(
        &self,
        target: &Lv,
        origin: &Origin,
        read_only: bool,
        fresh: bool,
        done: &AtomicU64,
        cancel: &Arc<AtomicBool>,
    ) -> Result<()> {
        let origin_class = self.class(&origin.class)?.clone();
        let vg = origin_class.volume_group.clone();
        let origin_lv = self.lookup(&vg, &origin.lv).await?.ok_or_else(|| {
            LvmError::Blocked(format!("the source {vg}/{} no longer exists", origin.lv))
        })?;
        let temp = temp_for(target);
        let cow = !origin_class.is_thin();

        // A consistent source: a snapshot LV as it is; a live volume through
        // a temporary snapshot. One left by an interrupted attempt holds the
        // point in time this copy stands for, so it is reused, never retaken.
        let source = if origin.frozen {
            if !origin_lv.is_active() {
                self.activate(&vg, &origin_lv.name).await?;
            }
            origin_lv.name.clone()
        } else if let Some(left) = self.lookup(&vg, &temp).await? {
            if cow && !left.attr.starts_with('s') {
                // Split from its origin by an interrupted removal: it no
                // longer shows any point in time.
                self.remove_lv(&vg, &temp).await?;
                return Err(LvmError::Blocked(format!(
                    "the temporary snapshot {vg}/{temp} was being removed: the point in time \
                     is lost"
                )));
            }
            // On the first pass the cut was just taken; a later pass checks
            // that it still holds its point in time.
            if !fresh {
                if cow {
                    if let Err(e) = self.check_cow(&vg, &temp).await {
                        let _ = self.remove_lv(&vg, &temp).await;
                        return Err(e);
                    }
                }
                tracing::info!(
                    vg,
                    temp,
                    "resuming the copy from its earlier temporary snapshot"
                );
            }
            temp.clone()
        } else {
            // The cut is made before the target: it is lost (an overflow, a
            // removal), and a new one would be a later point in time.
            return Err(LvmError::Blocked(format!(
                "the temporary snapshot {vg}/{temp} holding the point in time of this copy is \
                 gone"
            )));
        };
        let temp_used = source == temp;

        if let Err(e) = self
            .copy_blocks(&vg, &source, target, fresh, done, cancel)
            .await
        {
            // Cancelled: the target is going away, and so does the snapshot.
            // Any other failure keeps it, so a retry resumes the same cut.
            if temp_used && cancel.load(Ordering::Relaxed) {
                let _ = self.remove_lv(&vg, &temp).await;
            }
            return Err(e);
        }
        if temp_used && cow {
            if let Err(e) = self.check_cow(&vg, &temp).await {
                let _ = self.remove_lv(&vg, &temp).await;
                return Err(e);
            }
        }

        crate::fail_point!("lvm.copy.after_blocks");

        // Complete: the LV stops being marked incomplete, then the temporary
        // snapshot goes (a crash in between leaves only the snapshot, which
        // the next call removes).
        let mut cmd = self.lvm("lvchange").args(["--deltag", TAG_COPYING]);
        if read_only {
            cmd = cmd.args(["--permission", "r"]);
        }
        self.runner
            .run(&cmd.arg(format!("{}/{}", target.vg, target.name)))
            .await
            .map_err(|e| {
                self.mark_dirty();
                LvmError::from(e)
            })?;
        self.update_lv(&target.vg, &target.name, |lv| {
            lv.tags.retain(|t| t != TAG_COPYING);
            if read_only {
                lv.attr.replace_range(1..2, "r");
            }
        });
        crate::fail_point!("lvm.copy.after_untag");
        if temp_used {
            if let Err(e) = self.remove_lv(&vg, &temp).await {
                tracing::warn!(vg, lv = temp, error = %e, "could not remove the temporary snapshot");
            }
        }
        Ok(())
    }

    async fn copy_blocks(
        &self,
        vg: &str,
        source: &str,
        target: &Lv,
        fresh: bool,
        done: &AtomicU64,
        cancel: &Arc<AtomicBool>,
    ) -> Result<()> {
        let src = LocalAgent::device_path(vg, source);
        let dst = LocalAgent::device_path(&target.vg, &target.name);
        let dst_reads_zero = fresh && target.pool.is_some();
        let cancel = cancel.clone();
        let done_shared = Arc::new(AtomicU64::new(0));
        let progress = done_shared.clone();
        let task = tokio::task::spawn_blocking(move || {
            blockdev::copy(&src, &dst, dst_reads_zero, &cancel, &progress)
        });
        // Mirror the blocking task's progress for callers asking meanwhile.
        let mut task = task;
        loop {
            tokio::select! {
                r = &mut task => {
                    done.store(done_shared.load(Ordering::Relaxed), Ordering::Relaxed);
                    let copied = r.map_err(|e| LvmError::Internal(format!("copy task failed: {e}")))??;
                    tracing::debug!(target = %target.name, copied, "blocks copied");
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    done.store(done_shared.load(Ordering::Relaxed), Ordering::Relaxed);
                }
            }
        }
    }

    /// A COW snapshot that filled up during the copy no longer shows the
    /// point in time it was taken at: the copy is invalid.
    async fn check_cow(&self, vg: &str, temp: &str) -> Result<()> {
        let cmd = self
            .lvm("lvs")
            .args(["--reportformat", "json", "--units", "b", "--nosuffix"])
            .args(["-o", "lv_attr,data_percent"])
            .arg(format!("{vg}/{temp}"));
        let report: LvsReport = self.runner.run_json(&cmd).await.map_err(LvmError::from)?;
        let row = report
            .report
            .into_iter()
            .flat_map(|s| s.lv)
            .next()
            .ok_or_else(|| LvmError::Internal(format!("no report for {vg}/{temp}")))?;
        let invalid = row.lv_attr.chars().nth(4) == Some('I');
        let full = row
            .data_percent
            .trim()
            .parse::<f64>()
            .map(|p| p >= 100.0)
            .unwrap_or(false);
        if invalid || full {
            return Err(LvmError::Blocked(format!(
                "the temporary COW snapshot {vg}/{temp} overflowed: the point in time is lost"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cow_sizes() {
        let ext = 4 << 20;
        assert_eq!(cow_size(1 << 30, ext, false), 256 << 20);
        assert_eq!(cow_size(64 << 20, ext, false), 64 << 20);
        assert_eq!(cow_size(32 << 20, ext, false), 32 << 20);
        assert_eq!(cow_size(1 << 30, ext, true), 1 << 30);
    }
}
