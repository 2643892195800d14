//! `lodestone demo`: one volume's whole life on a throw-away volume group.
//!
//! Makes a sparse file, a loop device, a VG and a thin pool; serves the
//! driver in this process on a socket in the demo directory; then, as a CSI
//! client, creates a volume, stages, publishes, writes, reads back,
//! unpublishes, unstages and deletes it, printing each step. Cleans up after.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

use crate::client;
use crate::config::RunArgs;
use crate::csi::volume_capability::{access_mode, AccessMode, MountVolume};
use crate::csi::*;
use crate::runner::{Cmd, Runner};

/// `lodestone demo`'s own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's backing file, socket and mount points.
    #[arg(
        long,
        env = "LODESTONE_DEMO_DIR",
        default_value = "/tmp/lodestone-demo"
    )]
    pub dir: PathBuf,
    /// Size of the demo volume group's backing file, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub vg_mib: u64,
}

/// The driver's flags alone, to serve the demo's driver in this process.
#[derive(Parser)]
struct DriverFlags {
    #[command(flatten)]
    run: RunArgs,
}

const VG: &str = "lodestone-demo";
const LVM_NO_UDEV: &str = "activation { udev_sync = 0 udev_rules = 0 } \
                           devices { obtain_device_list_from_udev = 0 }";

fn lvm(sub: &str) -> Cmd {
    Cmd::new("lvm")
        .arg(sub)
        .args(["--config", LVM_NO_UDEV])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
}

struct Steps {
    started: Instant,
    n: u32,
}

impl Steps {
    fn say(&mut self, what: &str, took: Duration) {
        self.n += 1;
        println!(
            "[{:>2}] {:<58} {:>8.1} ms   (t={:.1}s)",
            self.n,
            what,
            took.as_secs_f64() * 1000.0,
            self.started.elapsed().as_secs_f64()
        );
    }
}

macro_rules! step {
    ($steps:expr, $what:expr, $body:expr) => {{
        let t = Instant::now();
        let out = $body;
        $steps.say(&$what, t.elapsed());
        out
    }};
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn teardown(runner: &Runner, image: &Path) {
    let _ = runner
        .run(&lvm("vgremove").args(["--force", "--yes", VG]))
        .await;
    if let Ok(out) = runner.run(&Cmd::new("losetup").arg("-j").arg(image)).await {
        for line in out.stdout.lines() {
            if let Some((dev, _)) = line.split_once(':') {
                let _ = runner
                    .run(&lvm("pvremove").args(["--force", "--yes", dev]))
                    .await;
                let _ = runner.run(&Cmd::new("losetup").args(["-d", dev])).await;
            }
        }
    }
    let _ = std::fs::remove_file(image);
}

pub async fn run(args: &DemoArgs) -> Result<(), String> {
    if !Path::new("/sys/class/misc/device-mapper").exists() {
        return Err("this kernel has no device-mapper; run the demo \
                    through scripts/demo.sh, which uses a VM when needed"
            .into());
    }
    let runner = Runner::new(Duration::from_secs(120));
    let dir = &args.dir;
    std::fs::create_dir_all(dir).map_err(err)?;
    let image = dir.join("vg.img");
    teardown(&runner, &image).await;
    let result = walk(args, &runner, dir, &image).await;
    teardown(&runner, &image).await;
    result
}

async fn walk(args: &DemoArgs, runner: &Runner, dir: &Path, image: &Path) -> Result<(), String> {
    let mut s = Steps {
        started: Instant::now(),
        n: 0,
    };
    println!("Lodestone demo: one volume, end to end, on a loop-file volume group\n");

    let loopdev = step!(
        s,
        format!("make a {} MiB loop-file VG with a thin pool", args.vg_mib),
        {
            let f = std::fs::File::create(image).map_err(err)?;
            f.set_len(args.vg_mib << 20).map_err(err)?;
            let out = runner
                .run(&Cmd::new("losetup").args(["--find", "--show"]).arg(image))
                .await
                .map_err(err)?;
            let dev = out.stdout.trim().to_string();
            runner
                .run(&lvm("pvcreate").args(["--yes", &dev]))
                .await
                .map_err(err)?;
            runner
                .run(&lvm("vgcreate").args([VG, &dev]))
                .await
                .map_err(err)?;
            let pool_size = format!("{}m", args.vg_mib * 3 / 4);
            runner
                .run(&lvm("lvcreate").args([
                    "--type",
                    "thin-pool",
                    "--size",
                    &pool_size,
                    "--name",
                    "pool0",
                    "--zero",
                    "y",
                    VG,
                ]))
                .await
                .map_err(err)?;
            dev
        }
    );
    println!("     backing device {loopdev}, VG {VG}, thin pool {VG}/pool0");

    let socket = dir.join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let class = format!("demo={VG}/pool0");
    let run_args = DriverFlags::parse_from([
        "lodestone",
        "--endpoint",
        &endpoint,
        "--node-id",
        "demo-node",
        "--device-class",
        &class,
        "--lvm-refresh-seconds",
        "0",
    ])
    .run;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = step!(
        s,
        "start the driver (controller + node) on a Unix socket",
        {
            let services = crate::server::build(&run_args).await.map_err(err)?;
            let listener = crate::server::bind(&socket).map_err(err)?;
            tokio::spawn(crate::server::serve(services, listener, async {
                let _ = stop_rx.await;
            }))
        }
    );
    let mut c = client::connect(&socket).await.map_err(err)?;
    let info = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .map_err(err)?;
    println!(
        "     plugin {} {}",
        info.get_ref().name,
        info.get_ref().vendor_version
    );

    let cap = VolumeCapability {
        block: None,
        mount: Some(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    };
    let volume = step!(s, "CreateVolume demo-volume (64 MiB, thin)", {
        c.controller
            .create_volume(CreateVolumeRequest {
                name: "demo-volume".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 64 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                parameters: HashMap::new(),
                ..Default::default()
            })
            .await
            .map_err(err)?
            .into_inner()
            .volume
            .ok_or("CreateVolume returned no volume")?
    });
    println!(
        "     volume id {}, {} bytes",
        volume.volume_id, volume.capacity_bytes
    );
    let id = volume.volume_id.clone();
    let staging: PathBuf = dir.join("staging");
    let target: PathBuf = dir.join("target");
    std::fs::create_dir_all(&staging).map_err(err)?;

    step!(s, "NodeStageVolume (mkfs.ext4 on the blank LV, mount)", {
        c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map_err(err)?
    });
    let publish = NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    step!(s, "NodePublishVolume (bind mount to the target)", {
        c.node
            .node_publish_volume(publish.clone())
            .await
            .map_err(err)?
    });
    let file = target.join("hello.txt");
    let text = "data written through a Lodestone volume\n";
    step!(s, format!("write {}", file.display()), {
        std::fs::write(&file, text).map_err(err)?
    });
    let unpublish = NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    };
    let unstage = NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    };
    step!(s, "NodeUnpublishVolume + NodeUnstageVolume", {
        c.node
            .node_unpublish_volume(unpublish.clone())
            .await
            .map_err(err)?;
        c.node
            .node_unstage_volume(unstage.clone())
            .await
            .map_err(err)?
    });
    step!(s, "NodeStageVolume + NodePublishVolume again (no mkfs)", {
        c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .map_err(err)?;
        c.node
            .node_publish_volume(publish.clone())
            .await
            .map_err(err)?
    });
    let back = step!(
        s,
        "read the file back",
        std::fs::read_to_string(&file).map_err(err)?
    );
    if back != text {
        return Err(format!("read back {back:?}, wrote {text:?}"));
    }
    println!("     read back: {}", back.trim());
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .map_err(err)?
        .into_inner();
    if let Some(u) = stats.usage.first() {
        println!(
            "     filesystem: {} bytes, {} used, {} available",
            u.total, u.used, u.available
        );
    }
    step!(s, "NodeUnpublishVolume + NodeUnstageVolume", {
        c.node.node_unpublish_volume(unpublish).await.map_err(err)?;
        c.node.node_unstage_volume(unstage).await.map_err(err)?
    });
    step!(s, "DeleteVolume", {
        c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id,
                secrets: HashMap::new(),
            })
            .await
            .map_err(err)?
    });
    let _ = stop_tx.send(());
    let _ = server.await;
    println!("\nDone: the volume was created, formatted, mounted, written, read back after a");
    println!(
        "full unstage/stage cycle, and deleted. Total {:.1}s.",
        s.started.elapsed().as_secs_f64()
    );
    Ok(())
}
