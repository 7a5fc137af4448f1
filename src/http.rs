//! apilb's HTTP endpoint on `metrics.listen`:
//!
//! - `/metrics`: Prometheus text format.
//! - `/healthz`: 200 while the agent loop is alive (it beats every tick).
//! - `/readyz`: 200 when HAProxy serves the frontend and at least one
//!   master is UP; otherwise 503 with the reason.
//! - `/status`: the [`Status`] as JSON, read by `apilb status`.
//!
//! Nothing served here is secret.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::status::Status;

/// What the endpoint serves from.
pub struct HttpState {
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// The latest status.
    pub status: watch::Receiver<Status>,
    /// Unix time (ms) of the agent loop's last beat.
    pub heartbeat: Arc<AtomicU64>,
    /// How old the last beat may be before `/healthz` fails.
    pub stale_after: Duration,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn route(state: &HttpState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    match req.uri().path() {
        "/metrics" => respond(StatusCode::OK, "text/plain; version=0.0.4", state.metrics.encode()),
        "/healthz" => {
            let age = now_ms().saturating_sub(state.heartbeat.load(Ordering::Relaxed));
            if Duration::from_millis(age) <= state.stale_after {
                respond(StatusCode::OK, "text/plain", "ok\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("the agent loop has not run for {age} ms\n"),
                )
            }
        }
        "/readyz" => match state.status.borrow().readiness() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ok\n"),
            Err(why) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        "/status" => match serde_json::to_string_pretty(&*state.status.borrow()) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz, /readyz or /status\n",
        ),
    }
}

/// Serves until `shutdown` completes.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let resp = route(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = conn.await;
        });
    }
}
