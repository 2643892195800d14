//! Prometheus metrics and a health endpoint.
//!
//! A tiny in-process registry: labelled counters and histograms that the
//! code updates as it goes (CSI calls in [`crate::driver`], external
//! commands in [`crate::runner`]), and gauges computed at scrape time from
//! state the process already keeps in memory (the LVM agent's report, the
//! controller's duplicate count). Everything renders to the Prometheus text
//! exposition format 0.0.4.
//!
//! `--metrics-address` serves it over a deliberately small HTTP/1.1
//! responder: `GET /metrics` and `GET /healthz` only, one request per
//! connection (`Connection: close`), a bounded request head, read and write
//! timeouts and a bounded number of connections. A scrape never runs a
//! command and never names a volume.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

use crate::driver::identity::ReadinessCheck;
use crate::lvm::agent::{LocalAgent, LvmStats};
use crate::lvm::controller::LvmController;
use crate::runner::Runner;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the latency histograms: 1 ms to 5 min.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

/// CSI calls by method and gRPC code.
pub static CSI_REQUESTS: CounterVec = CounterVec::new(
    "lodestone_csi_requests_total",
    "CSI calls handled, by method and gRPC status code.",
    &["method", "code"],
);

/// CSI call latency by method.
pub static CSI_DURATION: HistogramVec = HistogramVec::new(
    "lodestone_csi_request_duration_seconds",
    "Time to answer a CSI call, by method.",
    &["method"],
    DURATION_BUCKETS,
);

/// Records one finished CSI call.
pub fn observe_rpc(method: &str, code: Code, elapsed: Duration) {
    CSI_REQUESTS.inc(&[method, code_name(code)]);
    CSI_DURATION.observe(&[method], elapsed.as_secs_f64());
}

/// The canonical name of a gRPC status code, as the gRPC and CSI specs
/// spell it (`OK`, `NOT_FOUND`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

// ---------------------------------------------------------------------------
// Exposition format
// ---------------------------------------------------------------------------

/// A metrics page being written in the text exposition format. Each family
/// is a header followed by all of its samples.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family (`kind`: counter, gauge, histogram).
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample line.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(k);
                self.text.push_str("=\"");
                escape_label_value(&mut self.text, v);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(&number(value));
        self.text.push('\n');
    }

    /// A gauge family from (label values, value) rows.
    pub fn gauges<'a>(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        rows: impl IntoIterator<Item = (Vec<&'a str>, f64)>,
    ) {
        self.family(name, help, "gauge");
        for (values, value) in rows {
            let pairs: Vec<(&str, &str)> = labels.iter().copied().zip(values).collect();
            self.sample(name, &pairs, value);
        }
    }

    pub fn finish(self) -> String {
        self.text
    }
}

fn escape_label_value(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A sample value: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

type Series<T> = Mutex<BTreeMap<Vec<String>, T>>;

/// (name, value) pairs of a series.
fn label_pairs<'a>(labels: &[&'a str], values: &'a [String]) -> Vec<(&'a str, &'a str)> {
    labels
        .iter()
        .copied()
        .zip(values.iter().map(String::as_str))
        .collect()
}

fn key(labels: &[&str], values: &[&str]) -> Vec<String> {
    debug_assert_eq!(labels.len(), values.len(), "label values of {labels:?}");
    values.iter().map(|v| v.to_string()).collect()
}

/// A counter family with fixed label names.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Series<u64>,
}

impl CounterVec {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Self {
        CounterVec {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds one to the series with these label values (in label order).
    pub fn inc(&self, values: &[&str]) {
        let k = key(self.labels, values);
        *self
            .series
            .lock()
            .expect("counter poisoned")
            .entry(k)
            .or_default() += 1;
    }

    /// The series' value (0 if it never moved).
    pub fn get(&self, values: &[&str]) -> u64 {
        let k = key(self.labels, values);
        let series = self.series.lock().expect("counter poisoned");
        series.get(&k).copied().unwrap_or(0)
    }

    pub fn render(&self, out: &mut Exposition) {
        out.family(self.name, self.help, "counter");
        let series = self.series.lock().expect("counter poisoned").clone();
        for (values, n) in &series {
            out.sample(self.name, &label_pairs(self.labels, values), *n as f64);
        }
    }
}

/// Observations sorted into buckets by upper bound, plus their sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last counts what lies above every bound.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds not sorted");
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        // The bucket `le=b` holds every value <= b.
        let i = self.bounds.partition_point(|b| *b < value);
        self.counts[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// (upper bound, cumulative count) of each bucket, ending with +Inf.
    pub fn cumulative(&self) -> Vec<(f64, u64)> {
        let mut total = 0;
        let bounds = self.bounds.iter().copied().chain([f64::INFINITY]);
        bounds
            .zip(&self.counts)
            .map(|(b, n)| {
                total += n;
                (b, total)
            })
            .collect()
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// A histogram family with fixed label names and bucket bounds.
#[derive(Debug)]
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    series: Series<Histogram>,
}

impl HistogramVec {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> Self {
        HistogramVec {
            name,
            help,
            labels,
            bounds,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn observe(&self, values: &[&str], value: f64) {
        let k = key(self.labels, values);
        self.series
            .lock()
            .expect("histogram poisoned")
            .entry(k)
            .or_insert_with(|| Histogram::new(self.bounds))
            .observe(value);
    }

    /// A copy of the series with these label values, if it has any.
    pub fn get(&self, values: &[&str]) -> Option<Histogram> {
        let k = key(self.labels, values);
        let series = self.series.lock().expect("histogram poisoned");
        series.get(&k).cloned()
    }

    pub fn render(&self, out: &mut Exposition) {
        out.family(self.name, self.help, "histogram");
        let series = self.series.lock().expect("histogram poisoned").clone();
        let bucket = format!("{}_bucket", self.name);
        let sum = format!("{}_sum", self.name);
        let count = format!("{}_count", self.name);
        for (values, h) in &series {
            let pairs = label_pairs(self.labels, values);
            for (bound, n) in h.cumulative() {
                let le = number(bound);
                let mut with_le = pairs.clone();
                with_le.push(("le", &le));
                out.sample(&bucket, &with_le, n as f64);
            }
            out.sample(&sum, &pairs, h.sum);
            out.sample(&count, &pairs, h.count as f64);
        }
    }
}

// ---------------------------------------------------------------------------
// What a scrape reads
// ---------------------------------------------------------------------------

/// What the process is: the labels of `lodestone_build_info`.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    pub version: String,
    /// The backend (`--driver`): `lvm` or `rbd`.
    pub driver: String,
    /// `--mode`: `all`, `controller` or `node`.
    pub mode: String,
}

/// Everything a scrape or a health check reads; all of it in memory.
#[derive(Clone, Default)]
pub struct Sources {
    pub build: BuildInfo,
    /// The process's command runner (command counts and durations).
    pub runner: Option<Arc<Runner>>,
    /// This node's LVM agent (`--mode all` and `node`).
    pub lvm: Option<Arc<LocalAgent>>,
    /// The LVM controller (`--mode all` and `controller`).
    pub lvm_controller: Option<Arc<LvmController>>,
    /// The Identity service's readiness checks (what Probe answers).
    pub readiness: Vec<ReadinessCheck>,
}

impl Sources {
    /// Why the process is not ready, or None when every check passes.
    pub fn not_ready(&self) -> Option<String> {
        let problems: Vec<String> = self.readiness.iter().filter_map(|c| c()).collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

/// The whole metrics page.
pub fn render(sources: &Sources) -> String {
    let mut out = Exposition::default();
    let b = &sources.build;
    out.gauges(
        "lodestone_build_info",
        "Always 1; the labels say which build runs, which backend and which services.",
        &["version", "driver", "mode"],
        [(
            vec![b.version.as_str(), b.driver.as_str(), b.mode.as_str()],
            1.0,
        )],
    );
    out.gauges(
        "lodestone_ready",
        "1 when the readiness checks pass (what Probe and /healthz report), else 0.",
        &[],
        [(
            vec![],
            if sources.not_ready().is_none() {
                1.0
            } else {
                0.0
            },
        )],
    );
    CSI_REQUESTS.render(&mut out);
    CSI_DURATION.render(&mut out);
    if let Some(runner) = &sources.runner {
        runner.render_metrics(&mut out);
    }
    if let Some(agent) = &sources.lvm {
        lvm_gauges(&mut out, &agent.stats());
    }
    if let Some(controller) = &sources.lvm_controller {
        out.family(
            "lodestone_lvm_duplicates_found_total",
            "Times the controller found one request's volume or snapshot on two nodes or \
             classes (see the logs; nothing is deleted).",
            "counter",
        );
        let n = controller
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed);
        out.sample("lodestone_lvm_duplicates_found_total", &[], n as f64);
    }
    out.finish()
}

/// The LVM gauges of one agent's in-memory state.
fn lvm_gauges(out: &mut Exposition, stats: &LvmStats) {
    let classes = &stats.classes;
    let pool = |c: &crate::lvm::agent::ClassStats| c.pool.clone().unwrap_or_default();
    let pools: Vec<String> = classes.iter().map(pool).collect();
    let rows = |f: &dyn Fn(&crate::lvm::agent::ClassStats) -> Option<f64>| {
        classes
            .iter()
            .filter_map(|c| Some((vec![c.class.as_str(), c.vg.as_str()], f(c)?)))
            .collect::<Vec<_>>()
    };
    let pool_rows = |f: &dyn Fn(&crate::lvm::agent::ClassStats) -> Option<f64>| {
        classes
            .iter()
            .zip(&pools)
            .filter_map(|(c, p)| Some((vec![c.class.as_str(), c.vg.as_str(), p.as_str()], f(c)?)))
            .collect::<Vec<_>>()
    };
    let cv = &["class", "vg"];
    let cvp = &["class", "vg", "pool"];
    out.gauges(
        "lodestone_lvm_vg_size_bytes",
        "Size of the device class's volume group.",
        cv,
        rows(&|c| c.vg_size.map(|v| v as f64)),
    );
    out.gauges(
        "lodestone_lvm_vg_free_bytes",
        "Unallocated bytes in the device class's volume group.",
        cv,
        rows(&|c| c.vg_free.map(|v| v as f64)),
    );
    out.gauges(
        "lodestone_lvm_thin_pool_size_bytes",
        "Size of the thin pool of a thin device class.",
        cvp,
        pool_rows(&|c| c.pool_size.map(|v| v as f64)),
    );
    out.gauges(
        "lodestone_lvm_thin_pool_data_percent",
        "Percent of the thin pool's data space in use (as of the last LVM report).",
        cvp,
        pool_rows(&|c| c.pool_data_percent),
    );
    out.gauges(
        "lodestone_lvm_thin_pool_metadata_percent",
        "Percent of the thin pool's metadata space in use (as of the last LVM report).",
        cvp,
        pool_rows(&|c| c.pool_metadata_percent),
    );
    out.gauges(
        "lodestone_lvm_available_bytes",
        "Bytes a new volume of the device class may take now (what GetCapacity reports).",
        cv,
        rows(&|c| c.available.map(|v| v as f64)),
    );
    out.gauges(
        "lodestone_lvm_volumes",
        "Volumes of the device class on this node.",
        cvp,
        pool_rows(&|c| c.vg_size.map(|_| c.volumes as f64)),
    );
    out.gauges(
        "lodestone_lvm_snapshots",
        "Snapshots of the device class on this node.",
        cvp,
        pool_rows(&|c| c.vg_size.map(|_| c.snapshots as f64)),
    );
    if let Some(age) = stats.report_age {
        out.gauges(
            "lodestone_lvm_report_age_seconds",
            "Seconds since the last full LVM report (mutations update the state in between).",
            &[],
            [(vec![], age.as_secs_f64().floor())],
        );
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Bounds of the HTTP responder.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request head (request line and headers) read.
    pub max_request_bytes: usize,
    /// Time a client has to send its request head.
    pub read_timeout: Duration,
    /// Time a client has to take the answer.
    pub write_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_request_bytes: 8192,
            read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_connections: 16,
        }
    }
}

/// A parsed request: what the responder needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
}

/// Why a request head was refused: the status code to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(pub u16);

/// Where the request head ends (the index just past the blank line), if it
/// is complete. A bare `\n` line end is tolerated as well as `\r\n`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let rest = &buf[nl + 1..];
        if rest.starts_with(b"\n") {
            return Some(nl + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        i = nl + 1;
    }
    None
}

/// Parses a complete request head (request line and header lines).
pub fn parse_request(head: &[u8]) -> Result<Request<'_>, Refused> {
    let text = std::str::from_utf8(head).map_err(|_| Refused(400))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(Refused(400))?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refused(400));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Refused(400));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(Refused(if version.starts_with("HTTP/") {
            505
        } else {
            400
        }));
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        match line.split_once(':') {
            Some((name, _)) if !name.is_empty() && !name.contains([' ', '\t']) => {}
            _ => return Err(Refused(400)),
        }
    }
    // Origin form `/path?query`, or absolute form `http://host/path`.
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None => target,
    };
    if !target.starts_with('/') {
        return Err(Refused(400));
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Ok(Request { method, path })
}

/// A complete response: status, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// The bytes on the wire: status line, headers, body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            head.push_str("Allow: GET\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// The answer to a parsed request.
pub fn respond(req: &Request<'_>, sources: &Sources) -> Response {
    if req.method != "GET" {
        return Response::text(405, "only GET is served\n");
    }
    match req.path {
        "/metrics" => Response {
            status: 200,
            content_type: CONTENT_TYPE,
            body: render(sources),
        },
        "/healthz" => match sources.not_ready() {
            None => Response::text(200, "ok\n"),
            Some(why) => Response::text(503, format!("not ready: {why}\n")),
        },
        _ => Response::text(404, "not found; try /metrics or /healthz\n"),
    }
}

/// Binds `--metrics-address` (None when it is empty): done before anything
/// else starts, so an address that cannot be used stops the process at once.
pub async fn bind(address: &str) -> Result<Option<TcpListener>, String> {
    let address = address.trim();
    if address.is_empty() {
        return Ok(None);
    }
    TcpListener::bind(address)
        .await
        .map(Some)
        .map_err(|e| format!("cannot listen on {address:?} for metrics (--metrics-address): {e}"))
}

/// Serves `/metrics` and `/healthz` on the listener for the process's life.
pub fn spawn(listener: TcpListener, sources: Sources, limits: HttpLimits) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "serving metrics (/metrics, /healthz)");
    }
    tokio::spawn(serve(listener, Arc::new(sources), limits));
}

async fn serve(listener: TcpListener, sources: Arc<Sources>, limits: HttpLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = handle(stream, &sources, limits).await {
                tracing::debug!(error = %e, "metrics: connection ended with an error");
            }
        });
    }
}

/// One connection: read one request head, answer, close.
async fn handle(
    mut stream: TcpStream,
    sources: &Sources,
    limits: HttpLimits,
) -> std::io::Result<()> {
    let head = tokio::time::timeout(limits.read_timeout, read_head(&mut stream, limits)).await;
    let response = match head {
        Err(_) => Response::text(408, "request timeout\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(Err(refused)))) => Response::text(refused.0, format!("{}\n", reason(refused.0))),
        Ok(Ok(Some(Ok(buf)))) => match parse_request(&buf) {
            Ok(req) => respond(&req, sources),
            Err(refused) => Response::text(refused.0, format!("{}\n", reason(refused.0))),
        },
    };
    let bytes = response.to_bytes();
    let write = async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(limits.write_timeout, write)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))??;
    if !matches!(response.status, 200 | 503) {
        // The request may not have been read to its end: take a little of
        // what is left so that closing does not reset the connection before
        // the client has read the answer.
        let drain = async {
            let mut sink = [0u8; 4096];
            let mut left: usize = 64 * 1024;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    Ok(())
}

/// Reads up to the end of the request head. None: the client closed first;
/// `Err(Refused(431))`: the head is larger than allowed.
async fn read_head(
    stream: &mut TcpStream,
    limits: HttpLimits,
) -> std::io::Result<Option<Result<Vec<u8>, Refused>>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        let scanned = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[scanned..]).map(|e| scanned + e) {
            if end > limits.max_request_bytes {
                return Ok(Some(Err(Refused(431))));
            }
            buf.truncate(end);
            return Ok(Some(Ok(buf)));
        }
        if buf.len() >= limits.max_request_bytes {
            return Ok(Some(Err(Refused(431))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_escaped_labels() {
        let c = CounterVec::new(
            "t_requests_total",
            "Requests.\nTwo lines \\ here.",
            &["m", "c"],
        );
        c.inc(&["Create", "OK"]);
        c.inc(&["Create", "OK"]);
        c.inc(&["we\"ird\\\n", "NOT_FOUND"]);
        assert_eq!(c.get(&["Create", "OK"]), 2);
        assert_eq!(c.get(&["Create", "ABORTED"]), 0);
        let mut out = Exposition::default();
        c.render(&mut out);
        assert_eq!(
            out.finish(),
            "# HELP t_requests_total Requests.\\nTwo lines \\\\ here.\n\
             # TYPE t_requests_total counter\n\
             t_requests_total{m=\"Create\",c=\"OK\"} 2\n\
             t_requests_total{m=\"we\\\"ird\\\\\\n\",c=\"NOT_FOUND\"} 1\n"
        );
    }

    #[test]
    fn an_empty_family_still_has_its_header() {
        let c = CounterVec::new("t_empty_total", "Nothing yet.", &["a"]);
        let mut out = Exposition::default();
        c.render(&mut out);
        assert_eq!(
            out.finish(),
            "# HELP t_empty_total Nothing yet.\n# TYPE t_empty_total counter\n"
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.0025), "0.0025");
        assert_eq!(number(12.5), "12.5");
        assert_eq!(number(-1.0), "-1");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(1e20), "100000000000000000000");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        const B: &[f64] = &[0.1, 1.0, 10.0];
        let mut h = Histogram::new(B);
        for v in [0.05, 0.1, 0.5, 1.0, 7.0, 11.0, 1000.0] {
            h.observe(v);
        }
        assert_eq!(
            h.cumulative(),
            vec![(0.1, 2), (1.0, 4), (10.0, 5), (f64::INFINITY, 7)]
        );
        assert_eq!(h.count(), 7);
        assert!((h.sum() - 1019.65).abs() < 1e-9);
    }

    #[test]
    fn default_buckets_span_a_millisecond_to_five_minutes() {
        assert_eq!(DURATION_BUCKETS.first(), Some(&0.001));
        assert_eq!(DURATION_BUCKETS.last(), Some(&300.0));
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn renders_histograms() {
        const B: &[f64] = &[0.5, 2.0];
        let h = HistogramVec::new("t_seconds", "Latency.", &["method"], B);
        h.observe(&["Probe"], 0.25);
        h.observe(&["Probe"], 3.0);
        assert_eq!(h.get(&["Probe"]).unwrap().count(), 2);
        assert!(h.get(&["Other"]).is_none());
        let mut out = Exposition::default();
        h.render(&mut out);
        assert_eq!(
            out.finish(),
            "# HELP t_seconds Latency.\n# TYPE t_seconds histogram\n\
             t_seconds_bucket{method=\"Probe\",le=\"0.5\"} 1\n\
             t_seconds_bucket{method=\"Probe\",le=\"2\"} 1\n\
             t_seconds_bucket{method=\"Probe\",le=\"+Inf\"} 2\n\
             t_seconds_sum{method=\"Probe\"} 3.25\n\
             t_seconds_count{method=\"Probe\"} 2\n"
        );
    }

    #[test]
    fn gauges_and_unlabelled_samples() {
        let mut out = Exposition::default();
        out.gauges("t_up", "Up.", &[], [(vec![], 1.0)]);
        out.gauges(
            "t_bytes",
            "Bytes.",
            &["class", "vg"],
            [(vec!["thin", "vg0"], 1024.0), (vec!["thick", "vg1"], 0.5)],
        );
        assert_eq!(
            out.finish(),
            "# HELP t_up Up.\n# TYPE t_up gauge\nt_up 1\n\
             # HELP t_bytes Bytes.\n# TYPE t_bytes gauge\n\
             t_bytes{class=\"thin\",vg=\"vg0\"} 1024\nt_bytes{class=\"thick\",vg=\"vg1\"} 0.5\n"
        );
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }

    #[test]
    fn a_page_without_backends() {
        let sources = Sources {
            build: BuildInfo {
                version: "1.2.3".into(),
                driver: "lvm".into(),
                mode: "all".into(),
            },
            readiness: vec![Arc::new(|| Some("no LVM report yet".to_string()))],
            ..Sources::default()
        };
        observe_rpc("UnitTestCall", Code::NotFound, Duration::from_millis(3));
        let page = render(&sources);
        assert!(page
            .contains("lodestone_build_info{version=\"1.2.3\",driver=\"lvm\",mode=\"all\"} 1\n"));
        assert!(page.contains("\nlodestone_ready 0\n"));
        assert!(page.contains(
            "lodestone_csi_requests_total{method=\"UnitTestCall\",code=\"NOT_FOUND\"} 1\n"
        ));
        assert!(page.contains(
            "lodestone_csi_request_duration_seconds_bucket{method=\"UnitTestCall\",le=\"0.005\"} 1\n"
        ));
        assert!(!page.contains("lodestone_lvm_"));
        // Every sample line belongs to the family whose header came last.
        let mut family = String::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split(' ').next().unwrap().to_string();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&family), "{line} outside {family}");
            }
        }
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b""), None);
        assert_eq!(head_end(b"\r\n"), None);
    }

    #[test]
    fn parses_requests() {
        let ok = |s: &'static str| parse_request(s.as_bytes()).map(|r| (r.method, r.path));
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Ok(("GET", "/metrics"))
        );
        assert_eq!(
            ok("GET /metrics?name[]=a HTTP/1.0\r\n\r\n"),
            Ok(("GET", "/metrics"))
        );
        assert_eq!(ok("GET /healthz\n"), Err(Refused(400)));
        assert_eq!(ok("GET /healthz HTTP/1.1\n\n"), Ok(("GET", "/healthz")));
        assert_eq!(
            ok("GET http://h:9808/metrics HTTP/1.1\r\n\r\n"),
            Ok(("GET", "/metrics"))
        );
        assert_eq!(ok("GET http://h:9808 HTTP/1.1\r\n\r\n"), Ok(("GET", "/")));
        assert_eq!(
            ok("POST /metrics HTTP/1.1\r\n\r\n"),
            Ok(("POST", "/metrics"))
        );
        assert_eq!(ok("get /metrics HTTP/1.1\r\n\r\n"), Err(Refused(400)));
        assert_eq!(ok("GET  /metrics HTTP/1.1\r\n\r\n"), Err(Refused(400)));
        assert_eq!(ok("GET /metrics HTTP/1.1 x\r\n\r\n"), Err(Refused(400)));
        assert_eq!(ok("GET metrics HTTP/1.1\r\n\r\n"), Err(Refused(400)));
        assert_eq!(ok("GET /metrics HTTP/2.0\r\n\r\n"), Err(Refused(505)));
        assert_eq!(ok("GET /metrics SPDY\r\n\r\n"), Err(Refused(400)));
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nno colon\r\n\r\n"),
            Err(Refused(400))
        );
        assert_eq!(
            ok("GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Err(Refused(400))
        );
        assert_eq!(ok("\r\n\r\n"), Err(Refused(400)));
        assert_eq!(
            parse_request(b"GET /\xff HTTP/1.1\r\n\r\n"),
            Err(Refused(400))
        );
    }

    fn sources(ready: bool) -> Sources {
        let check: ReadinessCheck =
            Arc::new(move || (!ready).then(|| "volume group vg0 not found".to_string()));
        Sources {
            readiness: vec![check],
            ..Sources::default()
        }
    }

    #[test]
    fn routes() {
        let get = |path| Request {
            method: "GET",
            path,
        };
        let r = respond(&get("/metrics"), &sources(true));
        assert_eq!((r.status, r.content_type), (200, CONTENT_TYPE));
        assert_eq!(respond(&get("/healthz"), &sources(true)).body, "ok\n");
        let r = respond(&get("/healthz"), &sources(false));
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "not ready: volume group vg0 not found\n");
        assert_eq!(respond(&get("/"), &sources(true)).status, 404);
        let post = Request {
            method: "POST",
            path: "/metrics",
        };
        let r = respond(&post, &sources(true));
        assert_eq!(r.status, 405);
        let wire = String::from_utf8(r.to_bytes()).unwrap();
        assert!(wire.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(wire.contains("\r\nAllow: GET\r\n"));
        assert!(wire.contains("\r\nConnection: close\r\n"));
        assert!(wire.contains(&format!("\r\nContent-Length: {}\r\n", r.body.len())));
        assert!(wire.ends_with(&format!("\r\n\r\n{}", r.body)));
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_over_tcp_within_limits() {
        let listener = bind("127.0.0.1:0").await.unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits {
            max_request_bytes: 256,
            read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        spawn(listener, sources(false), limits);

        let reply = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("version=0.0.4"));
        assert!(reply.contains("\nlodestone_ready 0\n"));

        let reply = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
        assert!(reply.ends_with("not ready: volume group vg0 not found\n"));

        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(400));
        let reply = exchange(addr, big.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");

        let reply = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");

        // A client that never finishes its request is cut off.
        let started = std::time::Instant::now();
        let reply = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn an_address_in_use_is_an_error() {
        let taken = bind("127.0.0.1:0").await.unwrap().unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind(&addr).await.unwrap_err();
        assert!(err.contains("--metrics-address"), "{err}");
        assert!(bind("  ").await.unwrap().is_none());
        assert!(bind("not an address").await.is_err());
    }
}
