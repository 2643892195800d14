//! Block maps of LVM snapshots, for the CSI SnapshotMetadata service.
//!
//! Thin classes read them from the pool's metadata, never from data
//! blocks: the agent asks the kernel for a metadata snapshot (a frozen,
//! consistent copy of the mapping trees, `reserve_metadata_snap`), reads it
//! with thin-provisioning-tools (`thin_dump` for the chunks a thin device
//! maps, `thin_delta` for the chunks two devices map differently) and
//! releases it. The pool keeps serving I/O meanwhile. A pool has one
//! metadata snapshot at most, so the agent takes them one at a time, and
//! the reserve-read-release runs to its end even when the caller leaves;
//! one left behind by a crash between reserve and release is released by
//! the next call.
//!
//! A thin snapshot's map is exact at the pool's chunk size (64 KiB by
//! default): a chunk is listed when something wrote to it, even partly.
//! Thick classes keep full copies: a thick snapshot's allocated map is the
//! whole volume, and the delta between two of them is computed by reading
//! both and comparing them 64 KiB at a time (streamed through a 1 MiB
//! buffer; it stops when the caller leaves).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde::Deserialize;

use crate::config::DeviceClass;
#[cfg(test)]
use crate::core::blockmap::COMPARE_READ;
use crate::core::blockmap::{self, BlockMap, Extent, Side, StopOnDrop, COMPARE_CHUNK};
use crate::host::blockdev;
use crate::lvm::agent::LocalAgent;
use crate::lvm::detached::detach;
use crate::lvm::error::{LvmError, Result};
use crate::lvm::report::Lv;
use crate::runner::{Cmd, RunError};

/// How long reading a pool's metadata may take (it grows with the number
/// of mappings, not with data).
const METADATA_READ_TIMEOUT: Duration = Duration::from_secs(300);
const SECTOR: u64 = 512;

impl LocalAgent {
    /// The chunks of LV `lv` that hold data, or, with `base`, the chunks
    /// that differ between `base` and `lv` (two snapshots of one volume).
    pub(super) async fn read_block_map(
        &self,
        class: &str,
        lv: &str,
        base: Option<&str>,
    ) -> Result<BlockMap> {
        let class = self.class(class)?.clone();
        let vg = &class.volume_group;
        let target = self.existing(vg, lv).await?;
        let base = match base {
            Some(b) => Some(self.existing(vg, b).await?),
            None => None,
        };
        if class.thin_pool.is_none() {
            return match base {
                None => Ok(BlockMap::whole(target.size, self.extent_size_of(vg)?)),
                Some(base) => self.compare(vg, &base, &target).await,
            };
        }
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| LvmError::Unavailable("the agent is stopping".into()))?;
        detach("block map", async move {
            me.thin_block_map(&class, &target, base.as_ref()).await
        })
        .await
    }

    /// The pool-metadata read of [`Self::read_block_map`] (thin classes).
    async fn thin_block_map(
        &self,
        class: &DeviceClass,
        target: &Lv,
        base: Option<&Lv>,
    ) -> Result<BlockMap> {
        let vg = &class.volume_group;
        let pool = class.thin_pool.as_deref().unwrap_or_default();
        let mut wanted = vec![target.name.as_str()];
        wanted.extend(base.map(|b| b.name.as_str()));
        let ids = self.thin_ids(vg, pool, &wanted).await?;
        let _one_at_a_time = self.metadata_snap.lock().await;
        let tpool = self.pool_device(class, pool).await?;
        self.reserve_metadata_snap(&tpool).await?;
        crate::fail_point!("lvm.block_map.after_reserve");
        let meta = mapper_path(vg, &format!("{pool}_tmeta"));
        type Parse = fn(&str) -> std::result::Result<Chunks, String>;
        let (cmd, parse): (Cmd, Parse) = match base {
            None => (
                Cmd::new("thin_dump").args(["--dev-id".to_string(), ids[0].to_string()]),
                parse_dump,
            ),
            Some(_) => (
                Cmd::new("thin_delta").args([
                    "--snap1".to_string(),
                    ids[1].to_string(),
                    "--snap2".to_string(),
                    ids[0].to_string(),
                ]),
                parse_delta,
            ),
        };
        let cmd = cmd
            .arg("--metadata-snap")
            .arg(&meta)
            .timeout(METADATA_READ_TIMEOUT);
        let read = self.runner.run(&cmd).await.map(|out| parse(&out.stdout));
        // Released whatever the read did: a reserved metadata snapshot
        // costs the pool metadata space as long as it is kept.
        let released = self.release_metadata_snap(&tpool).await;
        let chunks = read.map_err(LvmError::from)?.map_err(|e| {
            LvmError::Internal(format!(
                "could not read the metadata of pool {vg}/{pool}: {e}"
            ))
        })?;
        released?;
        let chunk = chunks.chunk_sectors * SECTOR;
        Ok(BlockMap::new(
            target.size,
            chunk,
            chunks.ranges.into_iter().map(|(begin, length)| Extent {
                offset: begin * chunk,
                length: length * chunk,
            }),
        ))
    }

    /// The 64 KiB chunks in which two thick LVs differ, by reading both
    /// (activated first if they are not). Past the end of `base`, all of
    /// `target` counts as changed. Stops when the caller leaves.
    async fn compare(&self, vg: &str, base: &Lv, target: &Lv) -> Result<BlockMap> {
        for lv in [base, target] {
            if !lv.is_active() {
                self.activate(vg, &lv.name).await?;
            }
        }
        let paths = (
            Self::device_path(vg, &base.name),
            Self::device_path(vg, &target.name),
        );
        let (base_size, size) = (base.size, target.size);
        let _stop = StopOnDrop::default();
        let stop = _stop.flag();
        let started = Instant::now();
        let ranges = tokio::task::spawn_blocking(move || {
            differing_chunks(&paths.0, base_size, &paths.1, size, &stop)
        })
        .await
        .map_err(|e| LvmError::Internal(format!("compare task failed: {e}")))??;
        let map = BlockMap::new(size, COMPARE_CHUNK, ranges);
        tracing::info!(base = %base.name, target = %target.name, bytes = size,
            changed = map.bytes(), elapsed = ?started.elapsed(),
            "thick delta computed by reading both snapshots");
        Ok(map)
    }

    async fn existing(&self, vg: &str, lv: &str) -> Result<Lv> {
        self.lookup(vg, lv)
            .await?
            .ok_or_else(|| LvmError::LvMissing(format!("logical volume {vg}/{lv} does not exist")))
    }

    /// The thin device ids of `lvs` (in that order), which must be in `pool`.
    async fn thin_ids(&self, vg: &str, pool: &str, lvs: &[&str]) -> Result<Vec<u64>> {
        let cmd = self
            .lvm("lvs")
            .args(["--reportformat", "json", "-o", "lv_name,pool_lv,thin_id"])
            .args(lvs.iter().map(|lv| format!("{vg}/{lv}")));
        let report: ThinIdReport = self.runner.run_json(&cmd).await?;
        let rows: Vec<ThinIdRow> = report.report.into_iter().flat_map(|r| r.lv).collect();
        lvs.iter()
            .map(|name| {
                let row = rows.iter().find(|r| r.lv_name == *name).ok_or_else(|| {
                    LvmError::LvMissing(format!("logical volume {vg}/{name} does not exist"))
                })?;
                if row.pool_lv != pool {
                    return Err(LvmError::Internal(format!(
                        "{vg}/{name} is not a thin volume of pool {pool}"
                    )));
                }
                row.thin_id.trim().parse().map_err(|_| {
                    LvmError::Internal(format!("lvs gave {vg}/{name} no thin id: {row:?}"))
                })
            })
            .collect()
    }

    /// The device-mapper name of the pool's thin-pool target, activating
    /// the pool when it is not active. With thin volumes active it is
    /// `<vg>-<pool>-tpool`; a pool activated alone is `<vg>-<pool>` itself.
    async fn pool_device(&self, class: &DeviceClass, pool: &str) -> Result<String> {
        let vg = &class.volume_group;
        let found = || {
            let plain = dm_name(vg, pool);
            let tpool = format!("{plain}-tpool");
            let meta = mapper_path(vg, &format!("{pool}_tmeta"));
            if !meta.exists() {
                None
            } else if Path::new("/dev/mapper").join(&tpool).exists() {
                Some(tpool)
            } else {
                Path::new("/dev/mapper")
                    .join(&plain)
                    .exists()
                    .then_some(plain)
            }
        };
        if let Some(name) = found() {
            return Ok(name);
        }
        self.activate(vg, pool).await?;
        found().ok_or_else(|| {
            LvmError::Unavailable(format!(
                "thin pool {vg}/{pool} has no device-mapper device after activation"
            ))
        })
    }

    async fn reserve_metadata_snap(&self, tpool: &str) -> Result<()> {
        let reserve = dm_message(tpool, "reserve_metadata_snap");
        match self.runner.run(&reserve).await {
            Ok(_) => Ok(()),
            // One is held already: left by a crash of this agent (nothing
            // else on the node reserves them); release it and take a fresh one.
            Err(RunError::Failed { ref stderr, .. }) if stderr.contains("busy") => {
                tracing::info!(pool = tpool, "releasing a metadata snapshot left behind");
                self.release_metadata_snap(tpool).await?;
                self.runner.run(&reserve).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn release_metadata_snap(&self, tpool: &str) -> Result<()> {
        self.runner
            .run(&dm_message(tpool, "release_metadata_snap"))
            .await?;
        Ok(())
    }
}

/// Reads `target` (and `base`, as far as it goes) and returns the chunks
/// whose bytes differ.
fn differing_chunks(
    base: &Path,
    base_size: u64,
    target: &Path,
    size: u64,
    stop: &AtomicBool,
) -> Result<Vec<Extent>> {
    use std::os::unix::fs::FileExt;
    // Held exclusively: a removal (which zeroes a thick LV through an
    // exclusive open first) waits for the comparison instead of zeroing
    // what it reads.
    let open = |p: &Path| blockdev::open_exclusive_read(p).map_err(LvmError::Host);
    let (b, t) = (open(base)?, open(target)?);
    let whole = [Extent {
        offset: 0,
        length: size,
    }];
    blockmap::differing_chunks(
        &whole,
        base_size,
        size,
        |side, at, buf| {
            let (f, p) = match side {
                Side::Base => (&b, base),
                Side::Target => (&t, target),
            };
            f.read_exact_at(buf, at).map_err(|e| {
                LvmError::Internal(format!("cannot read {} at {at}: {e}", p.display()))
            })
        },
        || match stop.load(Ordering::Relaxed) {
            true => Err(LvmError::Internal("the comparison was abandoned".into())),
            false => Ok(()),
        },
    )
}

fn dm_message(device: &str, message: &str) -> Cmd {
    Cmd::new("dmsetup").args(["message", device, "0", message])
}

/// Device-mapper's name of an LV: dashes in either name doubled.
fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

fn mapper_path(vg: &str, lv: &str) -> PathBuf {
    Path::new("/dev/mapper").join(dm_name(vg, lv))
}

#[derive(Debug, Deserialize)]
struct ThinIdReport {
    #[serde(default)]
    report: Vec<ThinIdSection>,
}

#[derive(Debug, Deserialize)]
struct ThinIdSection {
    #[serde(default)]
    lv: Vec<ThinIdRow>,
}

#[derive(Debug, Deserialize)]
struct ThinIdRow {
    lv_name: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    thin_id: String,
}

/// Ranges of pool chunks (first chunk, count) and the chunk size.
#[derive(Debug, PartialEq, Eq)]
struct Chunks {
    chunk_sectors: u64,
    ranges: Vec<(u64, u64)>,
}

/// `thin_dump --dev-id N` XML: the chunks device N maps.
fn parse_dump(xml: &str) -> std::result::Result<Chunks, String> {
    parse_chunks(xml, |e| match e.name().as_ref() {
        b"single_mapping" => Ok(Some((number(e, "origin_block")?, 1))),
        b"range_mapping" => Ok(Some((number(e, "origin_begin")?, number(e, "length")?))),
        _ => Ok(None),
    })
}

/// `thin_delta` XML (not verbose): the chunks mapped differently by the two
/// devices, or by one only.
fn parse_delta(xml: &str) -> std::result::Result<Chunks, String> {
    parse_chunks(xml, |e| match e.name().as_ref() {
        b"different" | b"left_only" | b"right_only" => {
            Ok(Some((number(e, "begin")?, number(e, "length")?)))
        }
        _ => Ok(None),
    })
}

type Range = Option<(u64, u64)>;

fn parse_chunks(
    xml: &str,
    range: impl Fn(&BytesStart) -> std::result::Result<Range, String>,
) -> std::result::Result<Chunks, String> {
    let mut reader = Reader::from_str(xml);
    let mut chunk_sectors = None;
    let mut ranges = Vec::new();
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            Event::Start(e) | Event::Empty(e) => {
                if e.name().as_ref() == b"superblock" {
                    chunk_sectors = Some(number(&e, "data_block_size")?);
                } else if let Some(r) = range(&e)? {
                    ranges.push(r);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    match chunk_sectors {
        Some(c) if c > 0 => Ok(Chunks {
            chunk_sectors: c,
            ranges,
        }),
        _ => Err("no superblock with a data_block_size".into()),
    }
}

fn number(e: &BytesStart, name: &str) -> std::result::Result<u64, String> {
    let element = String::from_utf8_lossy(e.name().as_ref()).into_owned();
    let attr = e
        .try_get_attribute(name)
        .map_err(|err| format!("<{element}>: {err}"))?
        .ok_or_else(|| format!("<{element}> has no {name}"))?;
    std::str::from_utf8(&attr.value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("<{element}> {name} is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded in the test guest (thin-provisioning-tools 0.9.0): a thin
    // volume written at 4 KiB blocks 0 and 100, snapshot 2, then blocks
    // 100 and 1000..1040 written, snapshot 3.
    const DUMP: &str = r#"<superblock uuid="" time="2" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="0">
  <device dev_id="3" mapped_blocks="5" transaction="2" creation_time="2" snap_time="2">
    <single_mapping origin_block="0" data_block="0" time="0"/>
    <single_mapping origin_block="6" data_block="2" time="1"/>
    <range_mapping origin_begin="62" data_begin="3" length="3" time="1"/>
  </device>
</superblock>
"#;
    const DELTA: &str = r#"<superblock uuid="" time="2" transaction="3" data_block_size="128" nr_data_blocks="0">
  <diff left="2" right="3">
    <same begin="0" length="1"/>
    <different begin="6" length="1"/>
    <right_only begin="62" length="3"/>
    <left_only begin="70" length="2"/>
  </diff>
</superblock>
"#;

    #[test]
    fn a_dump_lists_every_mapped_chunk() {
        let c = parse_dump(DUMP).unwrap();
        assert_eq!(c.chunk_sectors, 128);
        assert_eq!(c.ranges, vec![(0, 1), (6, 1), (62, 3)]);
    }

    #[test]
    fn a_delta_lists_what_differs_not_what_is_shared() {
        let c = parse_delta(DELTA).unwrap();
        assert_eq!(c.ranges, vec![(6, 1), (62, 3), (70, 2)]);
    }

    #[test]
    fn malformed_output_is_an_error_not_an_empty_map() {
        assert!(parse_dump("").is_err());
        assert!(parse_dump("<superblock data_block_size=\"0\"></superblock>").is_err());
        let bad = DUMP.replace("origin_block=\"6\"", "origin_block=\"x\"");
        assert!(parse_dump(&bad).unwrap_err().contains("origin_block"));
        assert!(
            parse_delta("<superblock data_block_size=\"128\"><different begin=\"1\"/>")
                .unwrap_err()
                .contains("length")
        );
    }

    #[test]
    fn thick_deltas_are_the_chunks_whose_bytes_differ() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let size = 3 * COMPARE_READ as u64 + 1000;
        let mut old = vec![7u8; size as usize];
        std::fs::write(&a, &old[..size as usize - 2 * COMPARE_CHUNK as usize]).unwrap();
        old[5] = 1; // chunk 0
        old[COMPARE_READ + 70_000] = 2; // chunk 1 of the second read
        std::fs::write(&b, &old).unwrap();
        let base_size = size - 2 * COMPARE_CHUNK;
        let got = differing_chunks(&a, base_size, &b, size, &AtomicBool::new(false)).unwrap();
        let map = BlockMap::new(size, COMPARE_CHUNK, got);
        let c = COMPARE_CHUNK;
        let tail = base_size / c * c;
        assert_eq!(
            map.extents(),
            &[
                Extent {
                    offset: 0,
                    length: c
                },
                Extent {
                    offset: COMPARE_READ as u64 + c,
                    length: c
                },
                Extent {
                    offset: tail,
                    length: size - tail
                },
            ]
        );
        assert!(differing_chunks(&a, base_size, &b, size, &AtomicBool::new(true)).is_err());
    }

    #[test]
    fn device_mapper_names_double_dashes() {
        assert_eq!(
            dm_name("lodestone-thin", "pool-0"),
            "lodestone--thin-pool--0"
        );
        assert_eq!(
            mapper_path("vg", "pool_tmeta"),
            Path::new("/dev/mapper/vg-pool_tmeta")
        );
    }
}
