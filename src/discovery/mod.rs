//! Learning the masters from the Kubernetes API: list, then watch, the
//! EndpointSlices of the `default/kubernetes` service (or its Endpoints on
//! clusters without the discovery API), and report the ready addresses.
//!
//! The API servers maintain that object themselves: each adds its address
//! once its own `/readyz` passes and removes it when it shuts down, so it is
//! the authoritative list of masters. The watcher talks through apilb's own
//! frontend by default, so it needs no route of its own and survives the
//! loss of any master.
//!
//! resourceVersion is handled as client-go does: the list gives the version
//! the watch starts from; bookmarks and events advance it; a watch that
//! times out resumes from it; an expired version (410, as an HTTP status or
//! as an ERROR event) means a fresh list; other errors back off with jitter.

pub mod kubeconfig;
pub mod persist;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::config::{Address, Cidr, DEFAULT_DISCOVERY_KUBECONFIGS, Host, KubernetesDiscovery, Via};
use kubeconfig::KubeAccess;

/// What the watcher reports to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The ready API servers, validated, non-empty, sorted.
    Found {
        /// Their addresses.
        addresses: Vec<Address>,
        /// Addresses refused (outside `allowed_cidrs`, not IPs, …) and why.
        refused: Vec<String>,
        /// `endpointslices` or `endpoints`.
        api: &'static str,
    },
    /// The list or watch is working (a list, a watch start or a bookmark),
    /// even if nothing changed; at most every few seconds.
    Alive,
    /// The watch had to start over (expired resourceVersion, error).
    Restarted(String),
    /// Discovery cannot make progress now; the masters in use stay.
    Failing(String),
    /// The API answers, but its answer breaks discovery's rules and is
    /// refused as a whole ([`Decision::Refuse`]); the masters in use stay
    /// until an acceptable answer comes.
    Rejected(String),
}

/// How the watcher reaches the API.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `discovery.kubernetes` settings.
    pub settings: KubernetesDiscovery,
    /// apilb's frontend, used when `via: local`.
    pub local: SocketAddr,
    /// The name to verify the API servers under when the kubeconfig has no
    /// `tls-server-name` and requests go through the frontend
    /// (`health.tls.server_name`).
    pub server_name: String,
    /// How long a watch request lasts before it is renewed.
    pub watch_timeout: Duration,
}

/// Starts the watcher; it runs until aborted.
pub fn spawn(opts: Options, tx: mpsc::Sender<Update>) -> JoinHandle<()> {
    tokio::spawn(run(opts, tx))
}

/// Why one list/watch session ended.
#[derive(Debug)]
pub enum End {
    /// The resourceVersion expired: list again at once.
    Expired,
    /// Anything else: back off, then list again.
    Error(SessionError),
}

/// Why the watcher cannot be set up from the settings and the kubeconfig
/// (reported as [`Update::Failing`]; retried).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// No kubeconfig is configured and none of the well-known ones exists.
    #[error(
        "no kubeconfig yet (looked for {}; set discovery.kubernetes.kubeconfig)",
        DEFAULT_DISCOVERY_KUBECONFIGS.join(", ")
    )]
    NoKubeconfig,
    /// The configured kubeconfig does not exist (yet: the node may not
    /// have joined).
    #[error("kubeconfig {} does not exist (yet)", .0.display())]
    KubeconfigMissing(PathBuf),
    /// The kubeconfig cannot be used.
    #[error(transparent)]
    Kubeconfig(#[from] kubeconfig::KubeconfigError),
    /// The kubeconfig's server does not resolve (`via: kubeconfig`).
    #[error(transparent)]
    Resolve(#[from] kubeconfig::ResolveError),
    /// The name to verify the API server under is not a valid server name.
    #[error("{0:?} is not a valid server name")]
    ServerName(String),
}

/// Why one request to the API failed before or while its answer arrived.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The TCP connection failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Where it connected.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (e.g. the certificate is not verified).
    #[error("TLS to {addr}: {source}")]
    Tls {
        /// Where it connected.
        addr: SocketAddr,
        /// The handshake error.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed: the handshake, the request or reading the body.
    #[error("{0}")]
    Http(#[source] hyper::Error),
    /// The request could not be built (a header value).
    #[error("{0}")]
    Request(#[source] hyper::http::Error),
    /// No answer within the request's limit.
    #[error("no answer from {0} within 10s")]
    NoAnswer(SocketAddr),
    /// The body is larger than the limit.
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    /// A watch event (one line) is larger than the limit.
    #[error("a watch event larger than {} KiB", .0 >> 10)]
    EventTooLarge(usize),
}

/// Why a list/watch session failed; the watcher backs off and lists again.
/// Each names the API (`endpointslices`, `endpoints`) and the phase.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The list request failed.
    #[error(transparent)]
    ListRequest(RequestError),
    /// Neither the EndpointSlices nor the Endpoints list exists (404).
    #[error("neither EndpointSlices nor Endpoints are served")]
    NotServed,
    /// The list was refused: the credential is not valid (401).
    #[error("list {0}: 401: the kubeconfig's credential was rejected")]
    Unauthorized(&'static str),
    /// The list was refused: the identity lacks the permission (403).
    #[error(
        "list {0}: 403: the kubeconfig's identity may not list {0} in default (it needs list and watch, as \
         system:node-proxier grants)"
    )]
    Forbidden(&'static str),
    /// The list answered with another status.
    #[error("list {api}: HTTP {code}")]
    ListStatus {
        /// The API listed.
        api: &'static str,
        /// The HTTP status.
        code: u16,
    },
    /// The list's body did not end in time.
    #[error("list {0}: the answer did not end within {LIST_TIMEOUT:?}")]
    ListTimeout(&'static str),
    /// The list's body could not be read.
    #[error("list {api}: {source}")]
    ListBody {
        /// The API listed.
        api: &'static str,
        /// The read error.
        #[source]
        source: RequestError,
    },
    /// The list's body is not a list.
    #[error("list {api}: {source}")]
    ListParse {
        /// The API listed.
        api: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The watch request failed.
    #[error(transparent)]
    WatchRequest(RequestError),
    /// The watch answered with a status other than 200 or 410.
    #[error("watch {api}: HTTP {code}")]
    WatchStatus {
        /// The API watched.
        api: &'static str,
        /// The HTTP status.
        code: u16,
    },
    /// The watch stream broke.
    #[error("watch {api}: {source}")]
    WatchRead {
        /// The API watched.
        api: &'static str,
        /// The read error.
        #[source]
        source: RequestError,
    },
    /// Neither an event nor the end came within the watch's timeout.
    #[error("watch {0}: no event or end within its timeout")]
    WatchTimeout(&'static str),
    /// An event is not JSON of the expected shape.
    #[error("watch {api}: unreadable event: {source}")]
    UnreadableEvent {
        /// The API watched.
        api: &'static str,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The API sent an ERROR event other than 410.
    #[error("watch {api}: error {code}: {message}")]
    ErrorEvent {
        /// The API watched.
        api: &'static str,
        /// The event's code.
        code: u64,
        /// Its message, sanitized and bounded.
        message: String,
    },
    /// An event of a type the watcher does not know.
    #[error("watch {api}: unknown event type {kind:?}")]
    UnknownEvent {
        /// The API watched.
        api: &'static str,
        /// The type, sanitized and bounded.
        kind: String,
    },
}

/// The object being watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// discovery.k8s.io/v1 EndpointSlices (Kubernetes 1.21+).
    EndpointSlices,
    /// v1 Endpoints, on clusters without the discovery API.
    Endpoints,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::EndpointSlices => "endpointslices",
            Api::Endpoints => "endpoints",
        }
    }
    fn path(self) -> &'static str {
        match self {
            // system:node-proxier may list and watch, not get: select the
            // one object by label / field instead of fetching it by name.
            Api::EndpointSlices => {
                "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes"
            }
            Api::Endpoints => "/api/v1/namespaces/default/endpoints?fieldSelector=metadata.name%3Dkubernetes",
        }
    }
}

async fn run(opts: Options, tx: mpsc::Sender<Update>) {
    let mut backoff = Backoff::discovery();
    let mut last: Option<(Vec<Address>, Vec<String>)> = None;
    loop {
        let client = match Client::new(&opts) {
            Ok(c) => c,
            Err(why) => {
                let _ = tx.send(Update::Failing(why.to_string())).await;
                tokio::time::sleep(backoff.next_delay().max(Duration::from_secs(5))).await;
                continue;
            }
        };
        match session(&client, &opts, &tx, &mut last, &mut backoff).await {
            End::Expired => {
                let _ = tx
                    .send(Update::Restarted("the resourceVersion expired (410); listing again".into()))
                    .await;
            }
            End::Error(e) => {
                let delay = backoff.next_delay();
                let _ = tx.send(Update::Restarted(format!("{e}; retrying in {delay:.1?}"))).await;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One list followed by watches until something ends it.
async fn session(
    client: &Client,
    opts: &Options,
    tx: &mpsc::Sender<Update>,
    last: &mut Option<(Vec<Address>, Vec<String>)>,
    backoff: &mut Backoff,
) -> End {
    let (api, mut rv, mut objects) = match list(client, Api::EndpointSlices).await {
        Ok((rv, objects)) => (Api::EndpointSlices, rv, objects),
        Err(ListError::NotFound) => match list(client, Api::Endpoints).await {
            Ok((rv, objects)) => (Api::Endpoints, rv, objects),
            Err(e) => return e.into(),
        },
        Err(e) => return e.into(),
    };
    backoff.reset();
    let mut alive = Heartbeat::default();
    alive.beat(tx).await;
    report(&objects, api, opts, tx, last).await;
    loop {
        let path = format!(
            "{}&watch=1&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds={}",
            api.path(),
            opts.watch_timeout.as_secs().max(1)
        );
        let body = match client.get(&path).await {
            Ok((200, body)) => {
                alive.beat(tx).await;
                body
            }
            Ok((410, _)) => return End::Expired,
            Ok((code, _)) => return End::Error(SessionError::WatchStatus { api: api.name(), code }),
            Err(e) => return End::Error(SessionError::WatchRequest(e)),
        };
        let mut lines = LineReader { body, lines: LineSplitter::new(MAX_EVENT_BYTES) };
        let deadline = tokio::time::Instant::now() + opts.watch_timeout + Duration::from_secs(30);
        loop {
            let line = match tokio::time::timeout_at(deadline, lines.next()).await {
                Ok(Ok(Some(line))) => line,
                // The server ended the watch (timeoutSeconds): resume.
                Ok(Ok(None)) => break,
                Ok(Err(source)) => return End::Error(SessionError::WatchRead { api: api.name(), source }),
                Err(_) => return End::Error(SessionError::WatchTimeout(api.name())),
            };
            match apply_event(&line, api, &mut rv, &mut objects) {
                Ok(Event::Bookmark) => alive.beat(tx).await,
                Ok(Event::Changed) => report(&objects, api, opts, tx, last).await,
                Err(end) => return end,
            }
        }
    }
}

/// What one watch event did.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// An object was added, modified or deleted.
    Changed,
    /// Only the resourceVersion advanced.
    Bookmark,
}

/// The name of the API servers' own object: the `kubernetes`
/// EndpointSlice (kube-apiserver's endpoint reconciler writes it, named
/// after the service) or Endpoints. Another slice carrying the service's
/// label (anyone allowed to create slices in `default` can make one) is
/// not theirs and is ignored, which also bounds what is kept in memory.
pub const OWN_OBJECT: &str = "kubernetes";

/// The largest watch event or list kept: the API servers' own slice holds
/// one endpoint per API server, a few KiB.
pub const MAX_EVENT_BYTES: usize = 256 << 10;
/// The largest list response read.
pub const MAX_LIST_BYTES: usize = 1 << 20;
/// How long a list may take, its body included.
const LIST_TIMEOUT: Duration = Duration::from_secs(15);

/// Applies one line of a watch stream to the objects by name and to the
/// resourceVersion the next watch resumes from.
pub fn apply_event(
    line: &[u8],
    api: Api,
    rv: &mut String,
    objects: &mut BTreeMap<String, serde_json::Value>,
) -> Result<Event, End> {
    let event: WatchEvent = serde_json::from_slice(line)
        .map_err(|source| End::Error(SessionError::UnreadableEvent { api: api.name(), source }))?;
    match event.kind.as_str() {
        "ERROR" => {
            let code = event.object.get("code").and_then(|c| c.as_u64()).unwrap_or(0);
            if code == 410 {
                return Err(End::Expired);
            }
            let msg = event.object.get("message").and_then(|m| m.as_str()).unwrap_or("");
            let msg = crate::sanitize::untrusted(msg, crate::sanitize::API_TEXT);
            Err(End::Error(SessionError::ErrorEvent { api: api.name(), code, message: msg }))
        }
        kind @ ("ADDED" | "MODIFIED" | "DELETED" | "BOOKMARK") => {
            let meta: Meta = event
                .object
                .get("metadata")
                .and_then(|m| serde_json::from_value(m.clone()).ok())
                .unwrap_or_default();
            if !meta.resource_version.is_empty() {
                *rv = meta.resource_version;
            }
            match kind {
                "BOOKMARK" => return Ok(Event::Bookmark),
                _ if meta.name != OWN_OBJECT => return Ok(Event::Bookmark),
                "DELETED" => {
                    objects.remove(&meta.name);
                }
                _ => {
                    objects.insert(meta.name, event.object);
                }
            }
            Ok(Event::Changed)
        }
        other => Err(End::Error(SessionError::UnknownEvent {
            api: api.name(),
            kind: crate::sanitize::untrusted(other, 40),
        })),
    }
}

/// Sends `Update::Alive` at most every 5 seconds.
#[derive(Default)]
struct Heartbeat(Option<tokio::time::Instant>);

impl Heartbeat {
    async fn beat(&mut self, tx: &mpsc::Sender<Update>) {
        if self.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            self.0 = Some(tokio::time::Instant::now());
            let _ = tx.send(Update::Alive).await;
        }
    }
}

/// How a list ended without objects.
enum ListError {
    /// 404: this API is not served (try the next).
    NotFound,
    /// 410: the resourceVersion expired.
    Expired,
    /// Anything else.
    Other(SessionError),
}

impl From<ListError> for End {
    fn from(e: ListError) -> End {
        match e {
            ListError::Expired => End::Expired,
            ListError::NotFound => End::Error(SessionError::NotServed),
            ListError::Other(e) => End::Error(e),
        }
    }
}

/// Lists the objects; returns the list's resourceVersion and the objects
/// by name.
async fn list(client: &Client, api: Api) -> Result<(String, BTreeMap<String, serde_json::Value>), ListError> {
    let other = ListError::Other;
    let (code, body) = client.get(api.path()).await.map_err(|e| other(SessionError::ListRequest(e)))?;
    match code {
        200 => {}
        404 => return Err(ListError::NotFound),
        410 => return Err(ListError::Expired),
        401 => return Err(other(SessionError::Unauthorized(api.name()))),
        403 => return Err(other(SessionError::Forbidden(api.name()))),
        code => return Err(other(SessionError::ListStatus { api: api.name(), code })),
    }
    let bytes = tokio::time::timeout(LIST_TIMEOUT, read_all(body, MAX_LIST_BYTES))
        .await
        .map_err(|_| other(SessionError::ListTimeout(api.name())))?
        .map_err(|source| other(SessionError::ListBody { api: api.name(), source }))?;
    parse_list(&bytes).map_err(|source| other(SessionError::ListParse { api: api.name(), source }))
}

/// Parses a list response: its resourceVersion and the objects by name.
pub fn parse_list(bytes: &[u8]) -> Result<(String, BTreeMap<String, serde_json::Value>), serde_json::Error> {
    let list: List = serde_json::from_slice(bytes)?;
    let objects = list
        .items
        .into_iter()
        .map(|o| {
            let name = o
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_owned();
            (name, o)
        })
        .filter(|(name, _)| name == OWN_OBJECT)
        .collect();
    Ok((list.metadata.resource_version, objects))
}

/// What discovery makes of the API's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Use these masters; `refused` says which listed addresses were left
    /// out, and why.
    Use {
        /// The masters, sorted, unique, non-empty.
        addresses: Vec<Address>,
        /// Listed addresses left out, with the reason.
        refused: Vec<String>,
    },
    /// Use none of it: the answer breaks a rule that a real cluster never
    /// breaks (a loopback or link-local master, more masters than
    /// `max_masters`) or lists no usable master. The masters in use stay.
    Refuse(String),
}

/// Address ranges that never hold an API server of a real cluster, and
/// would divert a node's API traffic to itself or to a host service (cloud
/// metadata sits at 169.254.169.254). IPv4-mapped IPv6 addresses count as
/// their IPv4 address.
const SPECIAL_RANGES: [(&str, &str); 9] = [
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("0.0.0.0/8", "unspecified"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("::1/128", "loopback"),
    ("fe80::/10", "link-local"),
    ("::/128", "unspecified"),
    ("ff00::/8", "multicast"),
];

/// Why `ip` may not be a discovered master, if it may not: it lies in a
/// special range that no network of `allowed` explicitly opens (an allowed
/// network inside that range, such as `127.0.0.0/8`, does; `0.0.0.0/0`
/// does not).
fn special(ip: IpAddr, allowed: &[Cidr]) -> Option<&'static str> {
    let ip = ip.to_canonical();
    SPECIAL_RANGES.iter().find_map(|(range, what)| {
        let range: Cidr = range.parse().ok()?;
        let opened =
            allowed.iter().any(|c| c.contains(ip) && c.prefix >= range.prefix && range.contains(c.addr));
        (range.contains(ip) && !opened).then_some(*what)
    })
}

/// Applies discovery's rules to the API's objects (the API servers' own).
pub fn decide<'a>(
    objects: impl Iterator<Item = &'a serde_json::Value>,
    api: Api,
    settings: &KubernetesDiscovery,
) -> Decision {
    let (addresses, refused) = ready_addresses(objects, api, &settings.allowed_cidrs);
    let forbidden: Vec<String> = addresses
        .iter()
        .filter_map(|a| match a.host {
            Host::Ip(ip) => special(ip, &settings.allowed_cidrs).map(|what| format!("{a} is {what}")),
            Host::Dns(_) => None,
        })
        .collect();
    if !forbidden.is_empty() {
        return Decision::Refuse(format!(
            "refused the discovered set as a whole: {} (allowed only when discovery.kubernetes.allowed_cidrs \
             lists a network inside that range); keeping the masters in use",
            forbidden.join(", ")
        ));
    }
    if addresses.len() > settings.max_masters {
        return Decision::Refuse(format!(
            "refused the discovered set as a whole: it lists {} masters, more than \
             discovery.kubernetes.max_masters ({}); keeping the masters in use",
            addresses.len(),
            settings.max_masters
        ));
    }
    if addresses.is_empty() {
        return Decision::Refuse(format!(
            "the API lists no usable ready API server{}; keeping the masters in use",
            if refused.is_empty() { String::new() } else { format!(" (refused: {})", refused.join("; ")) }
        ));
    }
    Decision::Use { addresses, refused }
}

/// Computes the ready addresses and reports them when they changed.
async fn report(
    objects: &BTreeMap<String, serde_json::Value>,
    api: Api,
    opts: &Options,
    tx: &mpsc::Sender<Update>,
    last: &mut Option<(Vec<Address>, Vec<String>)>,
) {
    let (addresses, refused) = match decide(objects.values(), api, &opts.settings) {
        Decision::Use { addresses, refused } => (addresses, refused),
        Decision::Refuse(why) => {
            // Reported again only when it changes (or after an accepted set).
            if last.as_ref().map(|(_, r)| r) != Some(&vec![why.clone()]) {
                *last = Some((Vec::new(), vec![why.clone()]));
                let _ = tx.send(Update::Rejected(why)).await;
            }
            return;
        }
    };
    // Report a change of the usable set, or of what was refused.
    let seen = (addresses.clone(), refused.clone());
    if last.as_ref() == Some(&seen) {
        return;
    }
    *last = Some(seen);
    let _ = tx.send(Update::Found { addresses, refused, api: api.name() }).await;
}

/// The ready, valid, allowed addresses in EndpointSlices or Endpoints,
/// sorted and unique, and the refused ones with the reason.
pub fn ready_addresses<'a>(
    objects: impl Iterator<Item = &'a serde_json::Value>,
    api: Api,
    allowed: &[Cidr],
) -> (Vec<Address>, Vec<String>) {
    let mut found = Vec::new();
    let mut refused = Vec::new();
    let consider = |raw: &str, port: Option<u16>, found: &mut Vec<Address>, refused: &mut Vec<String>| {
        let Ok(ip) = raw.parse::<IpAddr>() else {
            refused.push(format!("{}: not an IP address", crate::sanitize::untrusted(raw, 64)));
            return;
        };
        let Some(port) = port else {
            refused.push(format!("{raw}: no https port"));
            return;
        };
        if !allowed.is_empty() && !allowed.iter().any(|c| c.contains(ip)) {
            let nets: Vec<String> = allowed.iter().map(Cidr::to_string).collect();
            refused.push(format!("{raw}: outside discovery.kubernetes.allowed_cidrs ({})", nets.join(", ")));
            return;
        }
        found.push(Address { host: Host::Ip(ip), port });
    };
    for obj in objects {
        match api {
            Api::EndpointSlices => {
                let Ok(slice) = serde_json::from_value::<Slice>(obj.clone()) else { continue };
                if slice.address_type == "FQDN" {
                    refused.push(format!(
                        "slice {}: FQDN endpoints are not supported",
                        crate::sanitize::untrusted(&slice.metadata.name, 64)
                    ));
                    continue;
                }
                let port = https_port(slice.ports.iter().map(|p| (p.name.as_deref(), p.port)));
                for ep in &slice.endpoints {
                    // An unknown (absent) condition counts as ready, as the
                    // EndpointSlice API defines.
                    if ep.conditions.ready == Some(false) {
                        continue;
                    }
                    for a in &ep.addresses {
                        consider(a, port, &mut found, &mut refused);
                    }
                }
            }
            Api::Endpoints => {
                let Ok(ep) = serde_json::from_value::<Endpoints>(obj.clone()) else { continue };
                for subset in &ep.subsets {
                    let port = https_port(subset.ports.iter().map(|p| (p.name.as_deref(), p.port)));
                    for a in &subset.addresses {
                        consider(&a.ip, port, &mut found, &mut refused);
                    }
                }
            }
        }
    }
    found.sort_by_key(|a| (a.host_str(), a.port));
    found.dedup();
    (found, refused)
}

fn https_port<'a>(ports: impl Iterator<Item = (Option<&'a str>, Option<u16>)>) -> Option<u16> {
    let ports: Vec<_> = ports.collect();
    ports
        .iter()
        .find(|(n, _)| *n == Some("https"))
        .or_else(|| if ports.len() == 1 { ports.first() } else { None })
        .and_then(|(_, p)| *p)
        .filter(|p| *p != 0)
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    metadata: Meta,
    #[serde(default)]
    items: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    name: String,
    #[serde(rename = "resourceVersion", default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct WatchEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    object: serde_json::Value,
}

#[derive(Deserialize)]
struct Slice {
    #[serde(default)]
    metadata: Meta,
    #[serde(rename = "addressType", default)]
    address_type: String,
    #[serde(default)]
    endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    ports: Vec<NamedPort>,
}

#[derive(Deserialize)]
struct SliceEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Conditions,
}

#[derive(Deserialize, Default)]
struct Conditions {
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct NamedPort {
    name: Option<String>,
    port: Option<u16>,
}

#[derive(Deserialize)]
struct Endpoints {
    #[serde(default)]
    subsets: Vec<Subset>,
}

#[derive(Deserialize)]
struct Subset {
    #[serde(default)]
    addresses: Vec<EndpointAddress>,
    #[serde(default)]
    ports: Vec<NamedPort>,
}

#[derive(Deserialize)]
struct EndpointAddress {
    ip: String,
}

/// Requests to the API with the kubeconfig's credential.
struct Client {
    access: KubeAccess,
    connect: SocketAddr,
    server_name: ServerName<'static>,
}

/// The kubeconfig to use: the configured one, or the first well-known one
/// that exists.
pub fn kubeconfig_path(settings: &KubernetesDiscovery) -> Result<PathBuf, SetupError> {
    if let Some(p) = &settings.kubeconfig {
        return Ok(p.clone());
    }
    DEFAULT_DISCOVERY_KUBECONFIGS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or(SetupError::NoKubeconfig)
}

impl Client {
    fn new(opts: &Options) -> Result<Client, SetupError> {
        let path = kubeconfig_path(&opts.settings)?;
        if !path.exists() {
            return Err(SetupError::KubeconfigMissing(path));
        }
        let access = kubeconfig::load(&path)?;
        if access.insecure {
            tracing::warn!(
                kubeconfig = %path.display(),
                "the kubeconfig says insecure-skip-tls-verify: discovery does not verify the API server's \
                 certificate, so whoever answers in its place can choose the masters (within discovery's rules)"
            );
        }
        let (connect, name) = match opts.settings.via {
            Via::Local => {
                (opts.local, access.tls_server_name.clone().unwrap_or_else(|| opts.server_name.clone()))
            }
            Via::Kubeconfig => (
                access.server_addr()?,
                access.tls_server_name.clone().unwrap_or_else(|| access.server_host.clone()),
            ),
        };
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| SetupError::ServerName(name.clone()))?;
        Ok(Client { access, connect, server_name })
    }

    /// GET on a new connection; returns the status and the body.
    async fn get(&self, path: &str) -> Result<(u16, Incoming), RequestError> {
        let addr = self.connect;
        let exchange = async {
            let tcp =
                TcpStream::connect(addr).await.map_err(|source| RequestError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(self.access.tls.clone())
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|source| RequestError::Tls { addr, source })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(RequestError::Http)?;
            tokio::spawn(conn);
            let mut req = Request::get(path)
                .header("host", self.access.server.as_str())
                .header("accept", "application/json")
                .header("user-agent", concat!("apilb/", env!("CARGO_PKG_VERSION")));
            if let Some(t) = &self.access.token {
                req = req.header("authorization", format!("Bearer {}", t.expose()));
            }
            let req = req.body(Empty::<Bytes>::new()).map_err(RequestError::Request)?;
            let resp = sender.send_request(req).await.map_err(RequestError::Http)?;
            Ok::<_, RequestError>((resp.status().as_u16(), resp.into_body()))
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .unwrap_or_else(|_| Err(RequestError::NoAnswer(addr)))
    }
}

/// Reads a body of at most `limit` bytes.
pub(crate) async fn read_all(mut body: Incoming, limit: usize) -> Result<Vec<u8>, RequestError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(RequestError::Http)?;
        if let Some(data) = frame.data_ref() {
            out.extend_from_slice(data);
            if out.len() > limit {
                return Err(RequestError::TooLarge(limit));
            }
        }
    }
    Ok(out)
}

/// Splits a stream of chunks into lines (watch events are one per line),
/// holding at most `max` bytes of an unfinished line. Pure, so the fuzzer
/// can drive it with any chunking.
pub struct LineSplitter {
    /// Bytes received and not yet returned as a line.
    buf: Vec<u8>,
    /// The longest line accepted.
    max: usize,
    /// Length of the unfinished line at the end of `buf`.
    open: usize,
}

impl LineSplitter {
    /// A splitter for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        LineSplitter { buf: Vec::new(), max, open: 0 }
    }

    /// The next complete, non-blank line, if one has been received.
    pub fn next_line(&mut self) -> Option<Vec<u8>> {
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Some(line);
            }
        }
        None
    }

    /// Adds received bytes. Fails as soon as a line grows past the bound,
    /// whether or not its end has arrived.
    pub fn push(&mut self, data: &[u8]) -> Result<(), RequestError> {
        for chunk in data.split_inclusive(|b| *b == b'\n') {
            let ends = chunk.ends_with(b"\n");
            let body = chunk.len() - usize::from(ends);
            if self.open + body > self.max {
                self.buf.clear();
                self.open = 0;
                return Err(RequestError::EventTooLarge(self.max));
            }
            self.buf.extend_from_slice(chunk);
            self.open = if ends { 0 } else { self.open + body };
        }
        Ok(())
    }

    /// What is left at the end of the stream, as a last line.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        self.open = 0;
        let rest = std::mem::take(&mut self.buf);
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }
}

/// Reads a watch body line by line.
struct LineReader {
    body: Incoming,
    lines: LineSplitter,
}

impl LineReader {
    async fn next(&mut self) -> Result<Option<Vec<u8>>, RequestError> {
        loop {
            if let Some(line) = self.lines.next_line() {
                return Ok(Some(line));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.lines.push(data)?;
                    }
                }
                Some(Err(e)) => return Err(RequestError::Http(e)),
                None => return Ok(self.lines.finish()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(json: &str) -> serde_json::Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn takes_ready_addresses_with_the_https_port_and_refuses_the_rest() {
        let s = slice(
            r#"{"metadata":{"name":"kubernetes"},"addressType":"IPv4",
                "endpoints":[{"addresses":["10.0.0.2"],"conditions":{"ready":true}},
                             {"addresses":["10.0.0.1"]},
                             {"addresses":["10.0.0.3"],"conditions":{"ready":false}},
                             {"addresses":["192.168.9.9"],"conditions":{"ready":true}},
                             {"addresses":["not-an-ip"],"conditions":{"ready":true}}],
                "ports":[{"name":"https","port":6443,"protocol":"TCP"}]}"#,
        );
        let allowed: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let (found, refused) = ready_addresses([&s].into_iter(), Api::EndpointSlices, &allowed);
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found, ["10.0.0.1:6443", "10.0.0.2:6443"]);
        assert_eq!(refused.len(), 2);
        assert!(refused[0].contains("192.168.9.9: outside discovery.kubernetes.allowed_cidrs (10.0.0.0/8)"));
        assert!(refused[1].contains("not-an-ip: not an IP address"));
    }

    #[test]
    fn reads_endpoints_of_old_clusters() {
        let e = slice(
            r#"{"metadata":{"name":"kubernetes"},"subsets":[{"addresses":[{"ip":"10.0.0.5"},{"ip":"10.0.0.4"}],
                "notReadyAddresses":[{"ip":"10.0.0.6"}],"ports":[{"name":"https","port":443}]}]}"#,
        );
        let (found, _) = ready_addresses([&e].into_iter(), Api::Endpoints, &[]);
        let found: Vec<String> = found.iter().map(ToString::to_string).collect();
        assert_eq!(found, ["10.0.0.4:443", "10.0.0.5:443"]);
    }

    #[test]
    fn watch_events_update_the_objects_and_the_resource_version() {
        let (mut rv, mut objects) = parse_list(
            br#"{"metadata":{"resourceVersion":"7"},"items":[{"metadata":{"name":"kubernetes"}}]}"#,
        )
        .unwrap();
        assert_eq!((rv.as_str(), objects.len()), ("7", 1));
        let mut apply = |line: &str| apply_event(line.as_bytes(), Api::EndpointSlices, &mut rv, &mut objects);
        let deleted =
            r#"{"type":"DELETED","object":{"metadata":{"name":"kubernetes","resourceVersion":"8"}}}"#;
        assert_eq!(apply(deleted).unwrap(), Event::Changed);
        let bookmark = r#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}"#;
        assert_eq!(apply(bookmark).unwrap(), Event::Bookmark);
        let added =
            r#"{"type":"ADDED","object":{"metadata":{"name":"kubernetes","resourceVersion":"10"},"x":1}}"#;
        assert_eq!(apply(added).unwrap(), Event::Changed);
        assert!(matches!(apply(r#"{"type":"ERROR","object":{"code":410}}"#), Err(End::Expired)));
        assert!(
            matches!(apply(r#"{"type":"ERROR","object":{"code":500,"message":"x"}}"#), Err(End::Error(e)) if e.to_string().contains("error 500: x"))
        );
        assert!(
            matches!(apply(r#"{"type":"WEIRD"}"#), Err(End::Error(e)) if e.to_string().contains("unknown event type"))
        );
        assert!(
            matches!(apply("{not json"), Err(End::Error(e)) if e.to_string().contains("unreadable event"))
        );
        assert_eq!(rv, "10");
        assert_eq!(objects.keys().collect::<Vec<_>>(), ["kubernetes"]);
        assert_eq!(objects["kubernetes"]["x"], 1);
    }

    fn settings(extra: &str) -> KubernetesDiscovery {
        let yaml = format!("masters: [10.0.0.1:6443]\ndiscovery:\n  kubernetes:\n{extra}");
        crate::config::Config::parse(&yaml, "t").unwrap().discovery.kubernetes.unwrap()
    }

    fn own_slice(addresses: &[&str]) -> serde_json::Value {
        let endpoints: Vec<_> = addresses.iter().map(|a| serde_json::json!({"addresses": [a]})).collect();
        serde_json::json!({"metadata": {"name": "kubernetes"}, "addressType": "IPv4",
                           "endpoints": endpoints, "ports": [{"name": "https", "port": 6443}]})
    }

    /// The discovered set is decided here, before anything is added to
    /// HAProxy: these addresses are never dialled by a test.
    #[test]
    fn special_addresses_refuse_the_whole_set_unless_explicitly_allowed() {
        let decide_for = |addrs: &[&str], extra: &str| {
            let s = own_slice(addrs);
            decide([&s].into_iter(), Api::EndpointSlices, &settings(extra))
        };
        let ok = decide_for(&["10.0.0.1", "10.0.0.2"], "    via: local\n");
        assert!(matches!(ok, Decision::Use { ref addresses, .. } if addresses.len() == 2), "{ok:?}");
        for (bad, what) in [
            ("127.0.0.1", "is loopback"),
            ("169.254.169.254", "is link-local"),
            ("0.0.0.0", "is unspecified"),
            ("224.0.0.1", "is multicast"),
            ("::1", "is loopback"),
            ("fe80::1", "is link-local"),
            ("::ffff:127.0.0.1", "is loopback"),
        ] {
            let d = decide_for(&["10.0.0.1", bad], "    via: local\n");
            assert!(
                matches!(&d, Decision::Refuse(why) if why.contains("refused the discovered set as a whole") && why.contains(what)),
                "{bad}: {d:?}"
            );
        }
        // A network inside the range opens it; one around it does not.
        assert!(matches!(
            decide_for(&["127.0.0.2"], "    allowed_cidrs: [127.0.0.0/8]\n"),
            Decision::Use { .. }
        ));
        assert!(matches!(
            decide_for(&["127.0.0.2"], "    allowed_cidrs: [0.0.0.0/0]\n"),
            Decision::Refuse(_)
        ));
        assert!(matches!(
            decide_for(&["169.254.169.254"], "    allowed_cidrs: [127.0.0.0/8]\n"),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn a_set_over_the_cap_is_refused_as_a_whole() {
        let many: Vec<String> = (1..=17).map(|i| format!("10.0.0.{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let s = own_slice(&refs);
        let d = decide([&s].into_iter(), Api::EndpointSlices, &settings("    via: local\n"));
        assert!(
            matches!(&d, Decision::Refuse(why) if why.contains("17 masters, more than discovery.kubernetes.max_masters (16)")),
            "{d:?}"
        );
        let d = decide([&s].into_iter(), Api::EndpointSlices, &settings("    max_masters: 17\n"));
        assert!(matches!(d, Decision::Use { ref addresses, .. } if addresses.len() == 17));
    }

    #[test]
    fn only_the_api_servers_own_object_is_kept() {
        let list = br#"{"metadata":{"resourceVersion":"1"},"items":[{"metadata":{"name":"kubernetes"}},{"metadata":{"name":"evil"}}]}"#;
        let (mut rv, mut objects) = parse_list(list).unwrap();
        assert_eq!(objects.keys().collect::<Vec<_>>(), ["kubernetes"]);
        let foreign = r#"{"type":"ADDED","object":{"metadata":{"name":"evil","resourceVersion":"2"}}}"#;
        assert_eq!(
            apply_event(foreign.as_bytes(), Api::EndpointSlices, &mut rv, &mut objects).unwrap(),
            Event::Bookmark
        );
        assert_eq!((rv.as_str(), objects.len()), ("2", 1));
    }

    #[test]
    fn api_text_is_escaped_and_bounded() {
        let (mut rv, mut objects) = (String::new(), BTreeMap::new());
        let msg = format!("bad\\nINFO forged\\u001b]0;x\\u0007{}", "y".repeat(200_000));
        let line = format!(r#"{{"type":"ERROR","object":{{"code":500,"message":"{msg}"}}}}"#);
        let Err(End::Error(e)) = apply_event(line.as_bytes(), Api::EndpointSlices, &mut rv, &mut objects)
        else {
            panic!("not an error")
        };
        let e = e.to_string();
        assert!(e.len() < 400, "{}", e.len());
        assert!(
            e.contains("bad\\nINFO forged\\u{1b}]0;x\\u{7}") && !e.contains('\n') && !e.contains('\u{1b}'),
            "{e}"
        );
    }

    #[test]
    fn the_line_splitter_bounds_every_line() {
        let mut l = LineSplitter::new(8);
        l.push(b"abc\n\n  \nde").unwrap();
        assert_eq!(l.next_line().unwrap(), b"abc\n");
        assert_eq!(l.next_line(), None);
        l.push(b"fgh").unwrap();
        assert!(l.push(b"ijkl").is_err(), "an unfinished line past the bound");
        let mut l = LineSplitter::new(8);
        assert!(l.push(b"0123456789\n").is_err(), "a whole line past the bound");
        let mut l = LineSplitter::new(8);
        l.push(b"01234567\n").unwrap();
        assert_eq!(l.next_line().unwrap(), b"01234567\n");
        l.push(b"tail").unwrap();
        assert_eq!(l.finish().unwrap(), b"tail");
    }
}
