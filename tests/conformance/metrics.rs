//! The metrics endpoint (`--metrics-address`) of the real binary: CSI calls
//! counted by method and gRPC code, latency histograms, build info,
//! `/healthz` following the readiness checks, the HTTP edges, and an
//! address that cannot be bound stopping the driver. Runs on the host and
//! in the guest; the LVM gauges are checked in `ctl_lvm`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use lodestone::csi;
use tonic::Code;

use crate::common::*;

/// A loopback address with a port that was free a moment ago.
pub fn free_address() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").to_string()
}

/// A driver (default flags) serving metrics; returns it and the address.
pub async fn start_with_metrics() -> (Driver, String) {
    let addr = free_address();
    let d = Driver::builder()
        .args(["--metrics-address", addr.as_str()])
        .start()
        .await;
    (d, addr)
}

/// Sends raw bytes and returns the status code and body of the answer.
pub fn http_raw(addr: &str, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).expect("send request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("read reply");
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {reply:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        head.contains("\r\nConnection: close"),
        "missing Connection: close in {head:?}"
    );
    (status, body.to_string())
}

pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes(),
    )
}

/// GET /metrics, which must answer 200.
pub fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The labels of a sample line, in order.
fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((name.trim_start_matches(',').to_string(), value));
        rest = &after[end..];
    }
    out
}

/// The value of the sample `name` whose labels are exactly `labels`.
pub fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, l) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.strip_suffix('}')?)),
                None => (series, Vec::new()),
            };
            let same = n == name
                && l.len() == labels.len()
                && l.iter()
                    .zip(labels)
                    .all(|((a, b), (c, d))| a == c && b == d);
            same.then(|| value.parse().expect("sample value"))
        })
}

/// Like `sample`, 0 when the series is absent (a counter that never moved).
pub fn counter(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(page, name, labels).unwrap_or(0.0)
}

fn requests(page: &str, method: &str, code: &str) -> f64 {
    counter(
        page,
        "lodestone_csi_requests_total",
        &[("method", method), ("code", code)],
    )
}

/// Build info names the version, the backend and the mode; the page is
/// served with the exposition format's content type.
#[tokio::test]
async fn build_info_and_content_type() {
    let (_d, addr) = start_with_metrics().await;
    let page = scrape(&addr);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        sample(
            &page,
            "lodestone_build_info",
            &[("version", version), ("driver", "lvm"), ("mode", "all")]
        ),
        Some(1.0),
        "{page}"
    );
    let raw = {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r
    };
    assert!(
        raw.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{raw}"
    );
    // Every family is announced before its samples.
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| page.contains(&format!("# TYPE {f} histogram")))
            .unwrap_or(name);
        assert!(
            page.contains(&format!("# TYPE {family} ")),
            "no TYPE for {line}"
        );
    }
}

/// Each CSI call is counted under its method and gRPC code, failures
/// included, and its latency lands in the method's histogram. Volume ids
/// never become labels.
#[tokio::test]
async fn calls_are_counted_by_method_and_code() {
    let (d, addr) = start_with_metrics().await;
    let before = scrape(&addr);
    let mut c = d.controller();
    let missing = "lvm1:nowhere:thin:0123456789abcdef0123456789abcdef";
    for _ in 0..2 {
        let r = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: missing.to_string(),
            })
            .await;
        expect_code(r, Code::NotFound, "ControllerGetVolume(missing)");
    }
    let r = c
        .create_volume(csi::CreateVolumeRequest {
            name: String::new(),
            volume_capabilities: vec![ext4()],
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "CreateVolume without a name");
    let r = c.list_volumes(csi::ListVolumesRequest::default()).await;
    expect_ok(r, "ListVolumes");
    let r = d
        .node()
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: missing.to_string(),
            volume_path: "relative/path".to_string(),
            staging_target_path: String::new(),
        })
        .await;
    expect_code(r, Code::NotFound, "NodeGetVolumeStats(bad path)");

    let after = scrape(&addr);
    let moved =
        |method: &str, code: &str| requests(&after, method, code) - requests(&before, method, code);
    assert_eq!(moved("ControllerGetVolume", "NOT_FOUND"), 2.0, "{after}");
    assert_eq!(moved("CreateVolume", "INVALID_ARGUMENT"), 1.0, "{after}");
    assert_eq!(moved("ListVolumes", "OK"), 1.0, "{after}");
    assert_eq!(moved("NodeGetVolumeStats", "NOT_FOUND"), 1.0, "{after}");
    assert_eq!(moved("CreateVolume", "OK"), 0.0, "{after}");

    let h = "lodestone_csi_request_duration_seconds";
    let get = [("method", "ControllerGetVolume")];
    assert_eq!(counter(&after, &format!("{h}_count"), &get), 2.0, "{after}");
    let inf = counter(
        &after,
        &format!("{h}_bucket"),
        &[("method", "ControllerGetVolume"), ("le", "+Inf")],
    );
    assert_eq!(inf, 2.0, "{after}");
    let fastest = counter(
        &after,
        &format!("{h}_bucket"),
        &[("method", "ControllerGetVolume"), ("le", "0.001")],
    );
    assert!(fastest <= inf, "{after}");
    assert!(
        sample(
            &after,
            &format!("{h}_bucket"),
            &[("method", "ControllerGetVolume"), ("le", "300")]
        )
        .is_some(),
        "no 5 min bucket: {after}"
    );
    assert!(
        !after.contains(missing) && !after.contains("relative/path"),
        "a volume id or path became a label: {after}"
    );
}

/// /healthz answers 200 exactly when Probe says ready, and 503 with the
/// reason otherwise (the host has no volume groups; the guest has them).
/// The address comes from LODESTONE_METRICS_ADDRESS here.
#[tokio::test]
async fn healthz_follows_the_readiness_checks() {
    let addr = free_address();
    let d = Driver::builder()
        .env("LODESTONE_METRICS_ADDRESS", &addr)
        .start()
        .await;
    let ready = expect_ok(d.identity().probe(csi::ProbeRequest {}).await, "Probe")
        .ready
        .unwrap_or(false);
    assert_eq!(ready, lvm_enabled());
    let (status, body) = http_get(&addr, "/healthz");
    let page = scrape(&addr);
    if ready {
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert_eq!(sample(&page, "lodestone_ready", &[]), Some(1.0));
    } else {
        assert_eq!(status, 503, "{body}");
        assert!(
            body.starts_with("not ready: ") && body.contains("volume group"),
            "{body}"
        );
        assert_eq!(sample(&page, "lodestone_ready", &[]), Some(0.0));
    }
}

/// Only GET of the two paths is served; anything else gets a clear status
/// and the connection is closed.
#[tokio::test]
async fn http_edges() {
    let (_d, addr) = start_with_metrics().await;
    assert_eq!(
        http_raw(
            &addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        )
        .0,
        405
    );
    assert_eq!(http_get(&addr, "/").0, 404);
    assert_eq!(http_get(&addr, "/metrics/../healthz").0, 404);
    assert_eq!(http_get(&addr, "/metrics?x=1").0, 200);
    assert_eq!(http_raw(&addr, b"hello\r\n\r\n").0, 400);
    let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(http_raw(&addr, big.as_bytes()).0, 431);
    // Still serving after all that.
    let expected = if lvm_enabled() { 200 } else { 503 };
    assert_eq!(http_get(&addr, "/healthz").0, expected);
}

/// A metrics address that cannot be bound is a startup error that says so.
#[test]
fn an_address_in_use_stops_the_driver() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, log) = Driver::builder()
        .args(["--metrics-address", addr.as_str()])
        .run_to_exit(Duration::from_secs(30));
    let status = status.unwrap_or_else(|| panic!("the driver kept running; log:\n{log}"));
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("--metrics-address") && log.contains(&addr),
        "{log}"
    );
}

/// Whether the server closes `s` (end of stream or reset, after at most a
/// short answer) within `wait`.
fn closed_within(mut s: &TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    let mut answer = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(_) => return false,
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 503 "),
        "a refused connection was told {answer:?}"
    );
    true
}

/// A field of /proc/PID/status, in its unit (kB for memory).
fn proc_status(pid: i32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// GET /metrics from a client among many: 200 with the page, or refused
/// (503 or closed) because the server is at its connection bound.
fn scrape_or_refused(addr: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes());
    let mut reply = Vec::new();
    match s.read_to_end(&mut reply) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("a scrape neither answered nor closed: {e}"),
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    match reply.strip_prefix("HTTP/1.1 200 OK\r\n") {
        Some(rest) => Ok(rest.to_string()),
        None if reply.is_empty() || reply.starts_with("HTTP/1.1 503 ") => Err(reply),
        None => panic!("unexpected answer: {reply}"),
    }
}

/// A hundred clients at once stay within the connection bound (16): idle
/// connections over the bound are closed at once instead of queuing behind
/// the ones served, a hundred concurrent scrapes all end quickly (answered
/// or refused), the server answers right after, and rounds of this leave
/// no descriptors, threads or memory behind.
#[tokio::test]
async fn a_hundred_connections_stay_bounded() {
    let (d, addr) = start_with_metrics().await;
    let pid = d.pid();
    let _ = scrape(&addr);
    let (fds, threads) = (open_fds(pid), proc_status(pid, "Threads:"));
    let mut rss = Vec::new();
    for round in 0..4 {
        // Idle clients: at most 16 are served (until the head timeout), the
        // others are closed at once.
        let started = std::time::Instant::now();
        let idle: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(&addr).expect("connect"))
            .collect();
        let closed = idle
            .iter()
            .filter(|s| closed_within(s, Duration::from_millis(200)))
            .count();
        assert!(
            (84..100).contains(&closed),
            "round {round}: {closed} of 100 idle connections closed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
        drop(idle);

        // A hundred scrapes at once.
        let started = std::time::Instant::now();
        let clients: Vec<_> = (0..100)
            .map(|_| {
                let addr = addr.clone();
                std::thread::spawn(move || scrape_or_refused(&addr))
            })
            .collect();
        let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        let served = answers.iter().filter(|a| a.is_ok()).count();
        assert!(served >= 1, "round {round}: every scrape was refused");
        for page in answers.iter().flatten() {
            assert!(page.contains("\nlodestone_build_info{"), "{page}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );

        // Answering again as soon as the slots are free.
        let started = std::time::Instant::now();
        while scrape_or_refused(&addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(5), "still refusing");
            std::thread::sleep(Duration::from_millis(50));
        }
        rss.push(proc_status(pid, "VmRSS:"));
    }
    // Nothing left behind: descriptors back to where they were (the served
    // connections end as their clients leave), no extra threads, and memory
    // flat from one round to the next.
    let started = std::time::Instant::now();
    while open_fds(pid) > fds {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} descriptors open, {fds} before",
            open_fds(pid)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(proc_status(pid, "Threads:") <= threads);
    eprintln!("RSS after each round (kB): {rss:?}");
    assert!(
        rss[3] < rss[1] + 8 * 1024,
        "memory grew from round to round (kB): {rss:?}"
    );
    assert_eq!(http_get(&addr, "/metrics").0, 200);
}
