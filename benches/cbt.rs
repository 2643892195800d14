//! Lodestone changed-block-tracking benchmark: GetMetadataAllocated and
//! GetMetadataDelta of thin snapshots against the raw commands they run
//! (reserve the pool's metadata snapshot, `thin_dump` / `thin_delta`,
//! release), and against what a backup tool does without them: reading
//! the two snapshots whole.
//!
//! Needs real LVM: `tests/vm/lvm-fixture.sh setup` (thin pool
//! `lodestone-thin/pool0`). `scripts/bench-cbt.sh` builds it and runs it in
//! the QEMU guest. A markdown report goes to stdout, progress to stderr.
//!
//! For each layout, on a 1 GiB thin volume: write `share` of its 64 KiB
//! chunks (in runs, or every n-th chunk for the fragmented layout),
//! snapshot A, write as many chunks again (shifted by five runs), snapshot
//! B; then time each call `ROUNDS` times (median).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lodestone::client::{self, block_pages, BlockQuery, Client};
use lodestone::csi::volume_capability::{access_mode, AccessMode, BlockVolume};
use lodestone::csi::*;

type R<T> = Result<T, String>;

const VG: &str = "lodestone-thin";
const POOL: &str = "pool0";
const GIB: u64 = 1 << 30;
const CHUNK: u64 = 64 << 10;
const ROUNDS: usize = 5;

/// How the written chunks lie.
#[derive(Clone, Copy)]
struct Layout {
    name: &'static str,
    /// Share of the volume's chunks written before A (and again before B).
    share: f64,
    /// Chunks per run: 16 (1 MiB runs) or 1 (every chunk its own range).
    run: u64,
}

const LAYOUTS: [Layout; 3] = [
    Layout {
        name: "10% in 1 MiB runs",
        share: 0.10,
        run: 16,
    },
    Layout {
        name: "10%, every 10th chunk",
        share: 0.10,
        run: 1,
    },
    Layout {
        name: "45% in 1 MiB runs",
        share: 0.45,
        run: 16,
    },
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Driver {
    child: Child,
    client: Client,
}

impl Driver {
    async fn start(dir: &Path) -> R<Driver> {
        let socket = dir.join("csi.sock");
        let log = std::fs::File::create(dir.join("driver.log")).map_err(|e| e.to_string())?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_lodestone"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", "bench"])
            .args(["--device-class", &format!("thin={VG}/{POOL}")])
            .args(["--lvm-refresh-seconds", "0"])
            .env_remove("LODESTONE_FAILPOINTS")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start the driver: {e}"))?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("the driver exited at start: {status}"));
            }
            if let Ok(c) = client::connect(&socket).await {
                return Ok(Driver { child, client: c });
            }
            if started.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                return Err("the driver did not start within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn block() -> VolumeCapability {
    VolumeCapability {
        block: Some(BlockVolume {}),
        mount: None,
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// The LV behind an id `lvm1:<node>:<class>:<key>` (`lvs1:` for snapshots).
fn lv_of(id: &str, prefix: &str) -> String {
    format!("{prefix}-{}", id.rsplit(':').next().unwrap_or_default())
}

fn thin_id(lv: &str) -> R<String> {
    let out = Command::new("lvs")
        .args(["--noheadings", "-o", "thin_id", &format!("{VG}/{lv}")])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run(program: &str, args: &[&str]) -> R<()> {
    let out = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// What the driver runs for one block map, run directly.
fn raw_map(lvs: &[String], ids: &[String]) -> R<Duration> {
    let tpool = format!("{}-{POOL}-tpool", VG.replace('-', "--"));
    let meta = format!("/dev/mapper/{}-{POOL}_tmeta", VG.replace('-', "--"));
    let started = Instant::now();
    let mut args = vec!["--reportformat", "json", "-o", "lv_name,pool_lv,thin_id"];
    let named: Vec<String> = lvs.iter().map(|lv| format!("{VG}/{lv}")).collect();
    args.extend(named.iter().map(String::as_str));
    run("lvs", &args)?;
    run(
        "dmsetup",
        &["message", &tpool, "0", "reserve_metadata_snap"],
    )?;
    let read = match ids {
        [one] => run("thin_dump", &["--metadata-snap", "--dev-id", one, &meta]),
        [a, b] => run(
            "thin_delta",
            &["--metadata-snap", "--snap1", a, "--snap2", b, &meta],
        ),
        _ => unreachable!(),
    };
    run(
        "dmsetup",
        &["message", &tpool, "0", "release_metadata_snap"],
    )?;
    read?;
    Ok(started.elapsed())
}

/// Reads a device whole, as a backup tool without block maps does.
fn read_whole(dev: &Path) -> R<Duration> {
    let started = Instant::now();
    let mut f = std::fs::File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf).map_err(|e| e.to_string())? > 0 {}
    Ok(started.elapsed())
}

/// Writes the layout's chunks, starting at chunk `shift`; returns how many.
fn write_chunks(dev: &Path, layout: Layout, shift: u64) -> R<u64> {
    let chunks = GIB / CHUNK;
    let wanted = (chunks as f64 * layout.share) as u64;
    let stride = if layout.run == 1 {
        (1.0 / layout.share).round() as u64
    } else {
        (layout.run as f64 / layout.share).round() as u64
    };
    let mut f = OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(|e| format!("{}: {e}", dev.display()))?;
    let data: Vec<u8> = (0..CHUNK * layout.run)
        .map(|i| (i as u8) ^ (shift as u8))
        .collect();
    let mut written = 0;
    let mut at = shift;
    while written < wanted && at + layout.run <= chunks {
        f.seek(SeekFrom::Start(at * CHUNK))
            .map_err(|e| e.to_string())?;
        f.write_all(&data).map_err(|e| e.to_string())?;
        written += layout.run;
        at += stride;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    Ok(written)
}

async fn snapshot(c: &mut Client, name: &str, source: &str) -> R<String> {
    let r = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: source.into(),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("CreateSnapshot: {e}"))?;
    Ok(r.into_inner().snapshot.ok_or("no snapshot")?.snapshot_id)
}

/// One listing through the driver: its time and the ranges and bytes listed.
async fn listing(c: &Client, base: Option<&str>, target: &str) -> R<(Duration, usize, u64)> {
    let query = match base {
        None => BlockQuery::Allocated(target),
        Some(base) => BlockQuery::Delta { base, target },
    };
    let mut sm = c.snapshot_metadata.clone();
    let started = Instant::now();
    let pages = block_pages(&mut sm, query, 0, 0, Default::default())
        .await
        .map_err(|e| format!("{query:?}: {e}"))?;
    let elapsed = started.elapsed();
    let ranges: Vec<(i64, i64)> = pages.into_iter().flat_map(|p| p.ranges).collect();
    let bytes = ranges.iter().map(|r| r.1 as u64).sum();
    Ok((elapsed, ranges.len(), bytes))
}

async fn restore(c: &mut Client, name: &str, snapshot: &str) -> R<String> {
    let r = c
        .controller
        .create_volume(CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(CapacityRange {
                required_bytes: GIB as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block()],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Snapshot(
                    volume_content_source::SnapshotSource {
                        snapshot_id: snapshot.into(),
                    },
                )),
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("restore: {e}"))?;
    Ok(r.into_inner().volume.ok_or("no volume")?.volume_id)
}

async fn layout_row(d: &mut Driver, layout: Layout, n: usize) -> R<String> {
    let c = &mut d.client;
    let v = c
        .controller
        .create_volume(CreateVolumeRequest {
            name: format!("cbt-bench-{n}"),
            capacity_range: Some(CapacityRange {
                required_bytes: GIB as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![block()],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("CreateVolume: {e}"))?
        .into_inner()
        .volume
        .ok_or("no volume")?
        .volume_id;
    let dev = PathBuf::from(format!("/dev/{VG}/{}", lv_of(&v, "lds")));
    let first = write_chunks(&dev, layout, 0)?;
    let a = snapshot(c, &format!("cbt-bench-{n}-a"), &v).await?;
    let second = write_chunks(&dev, layout, layout.run * 5)?;
    let b = snapshot(c, &format!("cbt-bench-{n}-b"), &v).await?;
    eprintln!("cbt: {}: {first} + {second} chunks written", layout.name);

    let lvs = [lv_of(&a, "ldsnap"), lv_of(&b, "ldsnap")];
    let ids = [thin_id(&lvs[0])?, thin_id(&lvs[1])?];
    let (mut alloc, mut delta, mut raw_alloc, mut raw_delta) = (vec![], vec![], vec![], vec![]);
    let (mut alloc_ranges, mut delta_ranges, mut delta_bytes) = (0, 0, 0);
    for _ in 0..ROUNDS {
        let (t, r, _) = listing(c, None, &a).await?;
        alloc.push(ms(t));
        alloc_ranges = r;
        let (t, r, bytes) = listing(c, Some(&a), &b).await?;
        delta.push(ms(t));
        (delta_ranges, delta_bytes) = (r, bytes);
        raw_alloc.push(ms(raw_map(&lvs[..1], &ids[..1])?));
        raw_delta.push(ms(raw_map(&lvs, &ids)?));
    }
    // Without block maps a backup tool reads both snapshots (here: their
    // restores, which are thin snapshots of them and read the same).
    let ra = restore(c, &format!("cbt-bench-{n}-ra"), &a).await?;
    let rb = restore(c, &format!("cbt-bench-{n}-rb"), &b).await?;
    let read = read_whole(&PathBuf::from(format!("/dev/{VG}/{}", lv_of(&ra, "lds"))))?
        + read_whole(&PathBuf::from(format!("/dev/{VG}/{}", lv_of(&rb, "lds"))))?;
    for id in [&ra, &rb, &v] {
        let _ = c
            .controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await;
    }
    for id in [&a, &b] {
        let _ = c
            .controller
            .delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
                ..Default::default()
            })
            .await;
    }
    Ok(format!(
        "| {} | {:.0} ({alloc_ranges} ranges) | {:.0} | {:.0} ({delta_ranges} ranges, {} MiB) | {:.0} | {:.0} |",
        layout.name,
        median(alloc),
        median(raw_alloc),
        median(delta),
        delta_bytes >> 20,
        median(raw_delta),
        ms(read),
    ))
}

async fn bench() -> R<String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut d = Driver::start(dir.path()).await?;
    let mut out = String::from(
        "| 1 GiB thin volume, chunks written before each snapshot | GetMetadataAllocated(A) ms | raw ms | GetMetadataDelta(A, B) ms | raw ms | reading A and B whole, ms |\n|---|---|---|---|---|---|\n",
    );
    for (n, layout) in LAYOUTS.into_iter().enumerate() {
        out.push_str(&layout_row(&mut d, layout, n).await?);
        out.push('\n');
    }
    out.push_str(&format!(
        "\nMedians of {ROUNDS} rounds. Raw: `lvs` (thin ids), `dmsetup message ... reserve_metadata_snap`, `thin_dump`/`thin_delta`, release: what the driver runs per call, run directly.\n"
    ));
    Ok(out)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match rt.block_on(bench()) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("cbt bench failed: {e}");
            std::process::exit(1);
        }
    }
}
