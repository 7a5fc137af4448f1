//! The `default/kubernetes` EndpointSlice of a test cluster, served by its
//! test API servers with list and watch semantics close to
//! kube-apiserver's: resourceVersions, history replay, bookmarks,
//! `timeoutSeconds`, 410 for expired versions (as an ERROR event in a
//! watch), and an "old cluster" mode that serves only v1 Endpoints.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Frame};
use hyper::{Response, StatusCode};
use tokio::sync::{broadcast, mpsc};

/// The response body type of the test servers.
pub type Body = BoxBody<Bytes, Infallible>;

/// A body fed by a channel: a watch stream.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut().0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Clone, Debug)]
enum Live {
    /// An event line at a resourceVersion.
    Event(u64, Arc<String>),
    /// Every watch must end with 410 now.
    Expire,
}

#[derive(Debug)]
struct State {
    rv: u64,
    endpoints: Vec<(IpAddr, bool)>,
    /// Events by resourceVersion, for watches that start in the past.
    history: Vec<(u64, Arc<String>)>,
    /// Versions at or below this one have expired.
    compacted: u64,
}

/// Counters a test can assert on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCounts {
    /// List requests served.
    pub lists: u64,
    /// Watch requests served.
    pub watches: u64,
    /// Watch requests answered with 410.
    pub expired: u64,
}

/// The API servers' own endpoints, shared by the servers of one cluster.
#[derive(Debug)]
pub struct Cluster {
    state: Mutex<State>,
    live: broadcast::Sender<Live>,
    port: u16,
    /// False: an old cluster without discovery.k8s.io (404), serving the
    /// v1 Endpoints instead.
    slices: bool,
    /// How often watches that asked for bookmarks get one.
    bookmark_every: Duration,
    counts: Mutex<ClusterCounts>,
    /// When the last change was published, for latency measurements.
    last_change: Mutex<Option<Instant>>,
    /// While set, a list answers its headers and then never its body (a
    /// hostile or broken API server); the senders are kept so the bodies
    /// stay open.
    stall_lists: Mutex<Option<Vec<mpsc::Sender<Bytes>>>>,
}

impl Cluster {
    /// A cluster whose API servers listen on `port` at `endpoints`
    /// (address, ready).
    pub fn new(port: u16, endpoints: &[(IpAddr, bool)], slices: bool) -> Arc<Cluster> {
        let (live, _) = broadcast::channel(1024);
        let cluster = Cluster {
            state: Mutex::new(State {
                rv: 100,
                endpoints: endpoints.to_vec(),
                history: Vec::new(),
                compacted: 0,
            }),
            live,
            port,
            slices,
            bookmark_every: Duration::from_millis(500),
            counts: Mutex::default(),
            last_change: Mutex::new(None),
            stall_lists: Mutex::new(None),
        };
        Arc::new(cluster)
    }

    /// Replaces the endpoints and publishes a MODIFIED event; returns when.
    pub fn set_endpoints(&self, endpoints: &[(IpAddr, bool)]) -> Instant {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.rv += 1;
        s.endpoints = endpoints.to_vec();
        let line = Arc::new(event_line("MODIFIED", &self.object(&s)));
        let rv = s.rv;
        s.history.push((rv, line.clone()));
        let at = Instant::now();
        *self.last_change.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
        let _ = self.live.send(Live::Event(rv, line));
        at
    }

    /// Expires every resourceVersion so far: open watches end with a 410
    /// ERROR event and resuming from an old version fails, forcing a
    /// re-list (what etcd compaction does).
    pub fn expire(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.compacted = s.rv;
        s.history.clear();
        let _ = self.live.send(Live::Expire);
    }

    /// Publishes an arbitrary watch event line (what a hostile or broken
    /// API server might send: a foreign slice, a huge object, an ERROR
    /// with any message), as the next resourceVersion.
    pub fn inject(&self, kind: &str, object: serde_json::Value) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.rv += 1;
        let line = Arc::new(event_line(kind, &object));
        let rv = s.rv;
        s.history.push((rv, line.clone()));
        let _ = self.live.send(Live::Event(rv, line));
    }

    /// From now on (`true`) or no longer, lists send their headers and
    /// then stall.
    pub fn stall_lists(&self, stall: bool) {
        *self.stall_lists.lock().unwrap_or_else(|e| e.into_inner()) = stall.then(Vec::new);
    }

    /// Request counters.
    pub fn counts(&self) -> ClusterCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn object(&self, s: &State) -> serde_json::Value {
        let rv = s.rv.to_string();
        if self.slices {
            let endpoints: Vec<_> = s
                .endpoints
                .iter()
                .map(|(ip, ready)| serde_json::json!({"addresses": [ip.to_string()], "conditions": {"ready": ready}}))
                .collect();
            serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": rv,
                             "labels": {"kubernetes.io/service-name": "kubernetes"}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "https", "port": self.port, "protocol": "TCP"}],
            })
        } else {
            let ready: Vec<_> = s
                .endpoints
                .iter()
                .filter(|e| e.1)
                .map(|(ip, _)| serde_json::json!({"ip": ip.to_string()}))
                .collect();
            let not: Vec<_> = s
                .endpoints
                .iter()
                .filter(|e| !e.1)
                .map(|(ip, _)| serde_json::json!({"ip": ip.to_string()}))
                .collect();
            serde_json::json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": rv},
                "subsets": [{"addresses": ready, "notReadyAddresses": not, "ports": [{"name": "https", "port": self.port}]}],
            })
        }
    }

    /// Serves a request for the endpoints, or `None` when `path` is not one.
    pub fn serve(self: &Arc<Self>, path: &str, query: &str) -> Option<Response<Body>> {
        let slices_path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
        let endpoints_path = "/api/v1/namespaces/default/endpoints";
        if path == slices_path && !self.slices {
            return Some(plain(StatusCode::NOT_FOUND, "404 page not found\n"));
        }
        // EndpointSlices on a current cluster; Endpoints on an old one.
        let served = if self.slices { slices_path } else { endpoints_path };
        if path != served {
            return None;
        }
        let param =
            |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')));
        if param("watch").is_some_and(|v| v == "1" || v == "true") {
            let rv: u64 = param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = param("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout =
                Duration::from_secs(param("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(300));
            Some(self.watch(rv, bookmarks, timeout))
        } else {
            self.counts.lock().unwrap_or_else(|e| e.into_inner()).lists += 1;
            if let Some(held) = self.stall_lists.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                let (tx, rx) = mpsc::channel::<Bytes>(1);
                held.push(tx);
                return Some(Response::new(ChannelBody(rx).boxed()));
            }
            let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let kind = if self.slices { "EndpointSliceList" } else { "EndpointsList" };
            let list = serde_json::json!({
                "kind": kind, "apiVersion": if self.slices { "discovery.k8s.io/v1" } else { "v1" },
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": [self.object(&s)],
            });
            Some(plain(StatusCode::OK, list.to_string()))
        }
    }

    fn watch(self: &Arc<Self>, since: u64, bookmarks: bool, timeout: Duration) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let (replay, mut live, expired, current_rv) = {
            let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let replay: Vec<Arc<String>> =
                s.history.iter().filter(|(rv, _)| *rv > since).map(|(_, l)| l.clone()).collect();
            (replay, self.live.subscribe(), since < s.compacted, s.rv)
        };
        {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            c.watches += 1;
            if expired {
                c.expired += 1;
            }
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            if expired {
                let _ = tx.send(Bytes::from(gone_line())).await;
                return;
            }
            for line in replay {
                if tx.send(Bytes::from(line.as_str().to_owned())).await.is_err() {
                    return;
                }
            }
            let mut last_rv = current_rv.max(since);
            let deadline = tokio::time::Instant::now() + timeout;
            let mut tick = tokio::time::interval(cluster.bookmark_every);
            loop {
                let line = tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = tick.tick(), if bookmarks => {
                        let rv = cluster.state.lock().unwrap_or_else(|e| e.into_inner()).rv;
                        let kind = if cluster.slices { "EndpointSlice" } else { "Endpoints" };
                        event_line("BOOKMARK", &serde_json::json!({"kind": kind, "metadata": {"resourceVersion": rv.to_string()}}))
                    }
                    item = live.recv() => match item {
                        Ok(Live::Event(rv, line)) if rv > last_rv => {
                            last_rv = rv;
                            line.as_str().to_owned()
                        }
                        Ok(Live::Event(..)) => continue,
                        Ok(Live::Expire) => {
                            let _ = tx.send(Bytes::from(gone_line())).await;
                            return;
                        }
                        Err(_) => return,
                    },
                };
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(ChannelBody(rx).boxed());
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
        r
    }
}

fn event_line(kind: &str, object: &serde_json::Value) -> String {
    format!("{}\n", serde_json::json!({"type": kind, "object": object}))
}

fn gone_line() -> String {
    event_line(
        "ERROR",
        &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "message": "too old resource version", "reason": "Expired", "code": 410}),
    )
}

/// A complete response.
pub fn plain(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(http_body_util::Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}
