//! apilb's HTTP endpoint on `metrics.listen`:
//!
//! - `/metrics`: Prometheus text format.
//! - `/healthz`: 200 while the agent loop is alive (it beats every tick).
//! - `/readyz`: 200 when HAProxy serves the frontend and at least one
//!   master is UP; otherwise 503 with the reason.
//! - `/status`: the [`Status`] as JSON, read by `apilb status`.
//!
//! Nothing served here is secret. `/status` (pids, paths, the config's
//! hash) goes only to clients on this host, when `metrics.listen` is
//! exposed to the network (`expose: [metrics]`). The endpoint holds a
//! bounded number of connections ([`MAX_CONNECTIONS`]).

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

/// At most this many connections are open at once. A connection beyond it
/// evicts the oldest one that has not sent its request yet; when every one
/// is busy answering, the newcomer is closed. Idle clients (slowloris, a
/// flood of open sockets) can therefore neither take the agent's file
/// descriptors nor keep a real request out.
pub const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one connection may last, answer included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The open connections: by accept order, whether each has sent its
/// request, and how to close it.
#[derive(Default)]
struct Connections {
    /// id → (request received, closer).
    open: std::collections::BTreeMap<
        u64,
        (Arc<std::sync::atomic::AtomicBool>, tokio::sync::oneshot::Sender<()>),
    >,
    /// The next id.
    next: u64,
}

impl Connections {
    /// Makes room for one more connection; returns its id and its busy
    /// flag and closer, or `None` when every open connection is busy.
    fn admit(
        &mut self,
    ) -> Option<(u64, Arc<std::sync::atomic::AtomicBool>, tokio::sync::oneshot::Receiver<()>)> {
        if self.open.len() >= MAX_CONNECTIONS {
            let idle =
                self.open.iter().find(|(_, (busy, _))| !busy.load(Ordering::Relaxed)).map(|(id, _)| *id)?;
            if let Some((_, close)) = self.open.remove(&idle) {
                let _ = close.send(());
            }
        }
        let id = self.next;
        self.next += 1;
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (close, closed) = tokio::sync::oneshot::channel();
        self.open.insert(id, (busy.clone(), close));
        Some((id, busy, closed))
    }
}

/// True when the peer is on this host: loopback, or the address it
/// connected to (a client on the node that dials the node's own address).
fn same_host(peer: std::net::SocketAddr, local: std::net::SocketAddr) -> bool {
    let canonical = |ip: std::net::IpAddr| ip.to_canonical();
    canonical(peer.ip()).is_loopback() || canonical(peer.ip()) == canonical(local.ip())
}

/// Serves until `shutdown` completes.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let connections = Arc::new(std::sync::Mutex::new(Connections::default()));
    loop {
        let (tcp, peer) = tokio::select! {
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
        let Some((id, busy, closed)) = connections.lock().unwrap_or_else(|e| e.into_inner()).admit() else {
            // Every slot answers a request: this one waits for none.
            drop(tcp);
            continue;
        };
        let local_only = tcp.local_addr().map(|local| same_host(peer, local)).unwrap_or(false);
        let (state, connections) = (state.clone(), connections.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                busy.store(true, Ordering::Relaxed);
                let resp = if req.uri().path() == "/status" && !local_only {
                    respond(
                        StatusCode::FORBIDDEN,
                        "text/plain",
                        "/status is served to this host only (run apilb status on the node); /metrics, /healthz \
                         and /readyz are served here\n",
                    )
                } else {
                    route(&state, &req)
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                _ = closed => {}
                _ = tokio::time::sleep(CONNECTION_TIMEOUT) => {}
            }
            connections.lock().unwrap_or_else(|e| e.into_inner()).open.remove(&id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_house_evicts_the_oldest_idle_connection_or_refuses() {
        let mut c = Connections::default();
        let mut admitted: Vec<_> = (0..MAX_CONNECTIONS).map(|_| c.admit().unwrap()).collect();
        // The third is busy answering; the first two are idle.
        admitted[0].1.store(true, Ordering::Relaxed);
        let (id, _, _) = c.admit().unwrap();
        assert_eq!(id, MAX_CONNECTIONS as u64);
        // The oldest idle one (id 1) was told to close.
        assert!(admitted[1].2.try_recv().is_ok());
        assert!(!c.open.contains_key(&1) && c.open.contains_key(&0));
        for (_, busy, _) in &admitted {
            busy.store(true, Ordering::Relaxed);
        }
        // Every connection busy (the newest too): the newcomer is refused.
        c.open.values().for_each(|(b, _)| b.store(true, Ordering::Relaxed));
        assert!(c.admit().is_none());
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
    }

    #[test]
    fn status_is_for_this_host() {
        let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert!(same_host(at("127.0.0.1:5000"), at("127.0.0.1:9716")));
        assert!(same_host(at("10.0.0.5:5000"), at("10.0.0.5:9716")));
        assert!(same_host(at("[::ffff:127.0.0.1]:5000"), at("[::]:9716")));
        assert!(!same_host(at("10.0.0.6:5000"), at("10.0.0.5:9716")));
    }
}
