//! Prometheus metrics and a health endpoint.
//!
//! The page is a [`prometheus_client`] registry made when the process starts
//! (see `server`): each part registers what it exports. Counters and
//! histograms move as the code goes (CSI calls here, through
//! [`observe_rpc`]; external commands in the runner); gauges are collectors
//! that read, at scrape time, state their owner already keeps in memory (the
//! LVM agent's report, the controller's duplicate count, the readiness
//! checks). The page is rendered in the Prometheus text exposition format
//! 0.0.4.
//!
//! `--metrics-address` serves it with hyper's HTTP/1.1 server: `GET
//! /metrics` and `GET /healthz` only, one request per connection
//! (`Connection: close`), a bounded request head, a deadline for the head
//! and one for the whole exchange, and a bounded number of connections (one
//! over the bound is closed at once). A scrape never runs a command and
//! never names a volume.

use std::convert::Infallible;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE as CT};
use hyper::{Method, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic::Code;

/// Content type of the page: the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

// ---------------------------------------------------------------------------
// CSI calls
// ---------------------------------------------------------------------------

/// The labels of `lodestone_csi_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

/// The labels of `lodestone_csi_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(crate::runner::DURATION_BUCKETS.iter().copied())
}

/// CSI calls by method and gRPC code.
static CSI_REQUESTS: LazyLock<Family<CallLabels, Counter>> = LazyLock::new(Family::default);

/// CSI call latency by method.
static CSI_DURATION: LazyLock<Histograms<MethodLabels>> =
    LazyLock::new(|| Family::new_with_constructor(duration_histogram));

/// Records one finished CSI call.
pub fn observe_rpc(method: &'static str, code: Code, elapsed: Duration) {
    let code = code_name(code);
    CSI_REQUESTS
        .get_or_create(&CallLabels { method, code })
        .inc();
    CSI_DURATION
        .get_or_create(&MethodLabels { method })
        .observe(elapsed.as_secs_f64());
}

/// Adds the CSI call families (`lodestone_csi_*`) to the registry.
pub fn register_rpc(registry: &mut Registry) {
    registry.register(
        "lodestone_csi_requests",
        "CSI calls handled, by method and gRPC status code",
        CSI_REQUESTS.clone(),
    );
    registry.register(
        "lodestone_csi_request_duration_seconds",
        "Time to answer a CSI call, by method",
        CSI_DURATION.clone(),
    );
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
// Build info
// ---------------------------------------------------------------------------

/// What the process is: the labels of `lodestone_build_info`.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfo {
    pub version: String,
    /// The backend (`--driver`): `lvm` or `rbd`.
    pub driver: String,
    /// `--mode`: `all`, `controller` or `node`.
    pub mode: String,
}

/// A registry with what this module exports: build info and CSI calls.
/// The other parts of the process add theirs.
pub fn registry(build: BuildInfo) -> Registry {
    let mut registry = Registry::default();
    let info = Family::<BuildInfo, Gauge>::default();
    info.get_or_create(&build).set(1);
    registry.register(
        "lodestone_build_info",
        "Always 1; the labels say which build runs, which backend and which services",
        info,
    );
    register_rpc(&mut registry);
    registry
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/// Why the process is not ready (None when it is): what `/healthz` reports.
pub type Health = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// What `--metrics-address` serves: the page and the health check. Both
/// read memory only.
#[derive(Clone)]
pub struct Endpoint {
    registry: Arc<Registry>,
    health: Health,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn new(registry: Registry, health: Health) -> Self {
        Endpoint {
            registry: Arc::new(registry),
            health,
        }
    }

    /// The whole metrics page.
    pub fn render(&self) -> String {
        let mut page = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut page, &self.registry)
            .expect("writing to a String does not fail");
        page
    }

    /// Why the process is not ready, or None when every check passes.
    pub fn not_ready(&self) -> Option<String> {
        (self.health)()
    }
}

/// Bounds of the HTTP responder.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest request head (request line and headers) read; a larger one
    /// is answered `431`.
    pub max_request_bytes: usize,
    /// Time a client has to send its request head; then the connection is
    /// closed.
    pub read_timeout: Duration,
    /// Time the answer may take on top of that; then the connection is
    /// closed.
    pub write_timeout: Duration,
    /// Connections served at once; one more is closed as soon as it is
    /// accepted.
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

type Response = hyper::Response<Full<Bytes>>;

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(CT, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(ALLOW, HeaderValue::from_static("GET"));
    }
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

/// The answer to a request: only GET of `/metrics` and `/healthz` (query
/// strings ignored); another method `405`, another path `404`.
pub fn respond<B>(req: &hyper::Request<B>, endpoint: &Endpoint) -> Response {
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is served\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, CONTENT_TYPE, endpoint.render()),
        "/healthz" => match endpoint.not_ready() {
            None => text(StatusCode::OK, PLAIN, "ok\n".into()),
            Some(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                PLAIN,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /metrics or /healthz\n".into(),
        ),
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
pub fn spawn(listener: TcpListener, endpoint: Endpoint, limits: HttpLimits) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(address = %addr, "serving metrics (/metrics, /healthz)");
    }
    tokio::spawn(serve(listener, endpoint, limits, Connections::new(limits)));
}

/// The connection slots: how many are served now.
#[derive(Debug, Clone)]
struct Connections {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Connections {
    fn new(limits: HttpLimits) -> Self {
        let max = limits.max_connections.max(1);
        Connections {
            slots: Arc::new(tokio::sync::Semaphore::new(max)),
            max,
        }
    }

    /// Connections being served.
    #[cfg(test)]
    fn active(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// What a connection over the bound is told before it is closed (if its
/// socket takes it without waiting).
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\
                      Connection: close\r\n\r\n";

async fn serve(listener: TcpListener, endpoint: Endpoint, limits: HttpLimits, conns: Connections) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false)
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .max_header_size(limits.max_request_bytes)
        .max_buf_size(limits.max_request_bytes.max(8192));
    let deadline = limits.read_timeout + limits.write_timeout;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(slot) = conns.slots.clone().try_acquire_owned() else {
            tracing::debug!(
                max = conns.max,
                "metrics: too many connections; closing one"
            );
            let _ = stream.try_write(BUSY);
            continue;
        };
        let endpoint = endpoint.clone();
        let service = hyper::service::service_fn(move |req| {
            std::future::ready(Ok::<_, Infallible>(respond(&req, &endpoint)))
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(deadline, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "metrics: connection ended with an error")
                }
                Err(_) => tracing::debug!("metrics: connection cut off at its deadline"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn endpoint(ready: bool) -> Endpoint {
        let build = BuildInfo {
            version: "1.2.3".into(),
            driver: "lvm".into(),
            mode: "all".into(),
        };
        Endpoint::new(
            registry(build),
            Arc::new(move || (!ready).then(|| "volume group vg0 not found".to_string())),
        )
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }

    #[test]
    fn a_page_without_backends() {
        observe_rpc("UnitTestCall", Code::NotFound, Duration::from_millis(3));
        let page = endpoint(false).render();
        assert!(page.contains(
            "# HELP lodestone_build_info Always 1; the labels say which build runs, which \
             backend and which services.\n# TYPE lodestone_build_info gauge\n"
        ));
        assert!(page
            .contains("lodestone_build_info{version=\"1.2.3\",driver=\"lvm\",mode=\"all\"} 1\n"));
        assert!(page.contains(
            "# HELP lodestone_csi_requests_total CSI calls handled, by method and gRPC status \
             code.\n# TYPE lodestone_csi_requests_total counter\n"
        ));
        assert!(page.contains(
            "lodestone_csi_requests_total{method=\"UnitTestCall\",code=\"NOT_FOUND\"} 1\n"
        ));
        assert!(page.contains("# TYPE lodestone_csi_request_duration_seconds histogram\n"));
        assert!(page.contains(
            "lodestone_csi_request_duration_seconds_bucket{method=\"UnitTestCall\",le=\"0.005\"} 1\n"
        ));
        assert!(page.contains(
            "lodestone_csi_request_duration_seconds_bucket{method=\"UnitTestCall\",le=\"300\"} 1\n"
        ));
        assert!(!page.contains("lodestone_lvm_"));
        assert!(!page.contains("# EOF"), "not OpenMetrics");
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

    #[tokio::test]
    async fn routes() {
        use http_body_util::BodyExt;
        let req = |method: Method, path: &str| {
            hyper::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
        };
        async fn body(r: Response) -> String {
            let bytes = r.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(bytes.to_vec()).unwrap()
        }
        let ready = endpoint(true);
        let r = respond(&req(Method::GET, "/metrics"), &ready);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()[CT], CONTENT_TYPE);
        assert_eq!(r.headers()[CONNECTION], "close");
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
        let r = respond(&req(Method::GET, "/metrics?name[]=a"), &ready);
        assert_eq!(r.status(), 200);
        let r = respond(&req(Method::GET, "/healthz"), &ready);
        assert_eq!(r.status(), 200);
        assert_eq!(body(r).await, "ok\n");
        let r = respond(&req(Method::GET, "/healthz"), &endpoint(false));
        assert_eq!(r.status(), 503);
        assert_eq!(body(r).await, "not ready: volume group vg0 not found\n");
        for path in ["/", "/metrics/", "/metrics/../healthz", "http://h:9808/x"] {
            assert_eq!(respond(&req(Method::GET, path), &ready).status(), 404);
        }
        let r = respond(&req(Method::GET, "http://h:9808/metrics"), &ready);
        assert_eq!(r.status(), 200);
        for method in [Method::POST, Method::HEAD, Method::DELETE, Method::PUT] {
            let r = respond(&req(method, "/metrics"), &ready);
            assert_eq!(r.status(), 405);
            assert_eq!(r.headers()[ALLOW], "GET");
            assert_eq!(r.headers()[CONNECTION], "close");
        }
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn start(limits: HttpLimits, ready: bool) -> (std::net::SocketAddr, Connections) {
        let listener = bind("127.0.0.1:0").await.unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Connections::new(limits);
        tokio::spawn(serve(listener, endpoint(ready), limits, conns.clone()));
        (addr, conns)
    }

    #[tokio::test]
    async fn serves_over_tcp_within_limits() {
        let limits = HttpLimits {
            max_request_bytes: 256,
            read_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        };
        let (addr, _) = start(limits, false).await;

        let reply = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");
        assert!(reply.contains("\nlodestone_build_info{"), "{reply}");

        let reply = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
        assert!(reply.ends_with("not ready: volume group vg0 not found\n"));

        let reply = exchange(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.0 503 "), "{reply}");

        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(400));
        let reply = exchange(addr, big.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");

        let reply = exchange(addr, b"hello\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
        assert!(reply.contains("\r\nConnection: close\r\n"), "{reply}");

        let reply = exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");
        assert!(reply.contains("\r\nAllow: GET\r\n"), "{reply}");

        // A client that never finishes its request is cut off.
        let started = std::time::Instant::now();
        let reply = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(!reply.contains("lodestone_"), "{reply}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// More clients than slots: the ones over the bound are closed at once,
    /// the served ones never exceed the bound, and once the slow ones are
    /// cut off the server answers again with every slot free.
    #[tokio::test]
    async fn connections_beyond_the_bound_are_closed_at_once() {
        let limits = HttpLimits {
            max_connections: 4,
            read_timeout: Duration::from_millis(500),
            ..HttpLimits::default()
        };
        let (addr, conns) = start(limits, true).await;
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept all of them.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(conns.active() <= 4, "{} served", conns.active());
        let started = std::time::Instant::now();
        let mut closed = 0;
        for s in &mut idle {
            let mut buf = Vec::new();
            let read = tokio::time::timeout(Duration::from_millis(200), s.read_to_end(&mut buf));
            if read.await.is_ok() {
                closed += 1;
                let reply = String::from_utf8_lossy(&buf);
                assert!(
                    reply.is_empty() || reply.starts_with("HTTP/1.1 503 "),
                    "{reply}"
                );
            }
        }
        assert!(closed >= 96, "only {closed} of 100 closed");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The idle ones that got a slot are cut off at the read timeout.
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(conns.active(), 0);
        let reply = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
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
