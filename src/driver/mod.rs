//! The CSI services: validate each request, take the operation lock, call
//! the core or backend, map the result to CSI messages and gRPC codes.

pub(crate) mod controller;
pub(crate) mod identity;
pub(crate) mod node;
pub(crate) mod snapshot_metadata;

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};

use crate::error::Result;

/// Runs one RPC body, logs its outcome and latency, counts it in the
/// metrics (method, gRPC code, latency), and maps its error.
pub(crate) async fn traced<T>(
    method: &'static str,
    subject: &str,
    body: impl Future<Output = Result<T>>,
) -> Result<Response<T>, Status> {
    let started = Instant::now();
    let result = body.await;
    let elapsed = started.elapsed();
    let code = result
        .as_ref()
        .map_or_else(|e| e.code(), |_| tonic::Code::Ok);
    crate::metrics::observe_rpc(method, code, elapsed);
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    match &result {
        Ok(_) => tracing::info!(method, subject, elapsed_ms, "ok"),
        Err(e) => {
            tracing::warn!(method, subject, elapsed_ms, code = ?e.code(), error = %e, "failed")
        }
    }
    result.map(Response::new).map_err(Status::from)
}
