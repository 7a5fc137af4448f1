//! The persistent-connection health checker (issue 15, fleet-scale checks).
//!
//! HAProxy's own check opens a new TCP connection and does a full TLS
//! handshake for every `GET /readyz`: on the API server that handshake costs
//! about four times the request (docs/health-checks.md, "Load on the API
//! servers"). A [`Checker`] keeps **one** TLS connection per master open and
//! sends the request on it every interval, so the server pays for one
//! handshake per node and master for as long as the connection lives.
//!
//! What it shares with HAProxy's check: the CA, the server name (SNI, the
//! name verified and the `Host` header), the credential (client certificate
//! on the handshake, or `Authorization: Bearer`), the path and the accepted
//! statuses, with 401/403 accepted in bootstrap exactly like the rendered
//! `http-check expect` ([`Settings::from_config`]).
//!
//! How it decides:
//!
//! - **Up** after `rise` consecutive answers with an accepted status,
//!   **Down** after `fall` consecutive failures. A failure is: no TCP
//!   connection, a failed TLS handshake, another status ([`Failure::Status`]),
//!   a broken or oversized answer, or **no answer within
//!   [`Settings::timeout`]** ([`Failure::Timeout`]: a hung server). An
//!   answer that comes late but within the timeout is a success; its
//!   latency is reported.
//! - An error on a **reused** connection before any answer (the server
//!   closed an idle connection, or died) is not a verdict: the check is
//!   retried at once on a fresh connection, and that result counts.
//! - When the kept connection closes between checks (the server crashed or
//!   restarted), the next check is pulled forward (at most one every
//!   [`Settings::fastinter`]): a crash is seen in milliseconds, not at the
//!   next interval.
//! - While failing, checks run every `fastinter`, and connection attempts
//!   back off from `fastinter` to `interval` (never more often than
//!   HAProxy's own check would connect).
//! - The first check waits for [`Settings::phase`], a per-node offset
//!   within one interval ([`phase_for`]), so a fleet started at once does
//!   not check in lockstep.
//!
//! Every bound is explicit: response headers ([`MAX_HEADER_BYTES`],
//! [`MAX_HEADERS`]), body ([`MAX_BODY_BYTES`]), every wait.
//!
//! Verdict changes are published on a [`tokio::sync::watch`] channel
//! ([`Checker::spawn`]); the counters in [`Report`] are updated in place
//! without waking watchers. [`push`] applies a verdict to HAProxy through
//! the runtime API (`set server … health up|down`), HAProxy's own check
//! staying on as a slow backstop.

pub mod push;
mod tls;

use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::Config;
use crate::inputs::{Credential, Inputs, Secret};

pub use tls::client_config;

/// The most of a response body read: `/readyz?verbose` is a few hundred
/// bytes; anything larger is not an API server's health answer.
pub const MAX_BODY_BYTES: usize = 16 << 10;
/// The most bytes of response headers accepted (hyper's own limit is set to
/// this).
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// The most response header fields accepted.
pub const MAX_HEADERS: usize = 64;

/// Why a checker cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The TLS client configuration could not be built from the check's
    /// files (CA, client certificate).
    #[error("TLS client configuration: {0}")]
    Tls(String),
    /// The configured server name is not a valid TLS server name.
    #[error("{name:?} is not a valid TLS server name")]
    ServerName {
        /// The name as configured.
        name: String,
        /// What rustls said.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
}

/// Why a check failed. Kept as text (not the error values) so a
/// [`Verdict`] can be cloned, compared and sent on a watch channel.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No TCP connection: refused, unreachable, or the name did not
    /// resolve (HAProxy: L4CON).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TCP connection was not established within the connect limit
    /// (HAProxy: L4TOUT).
    #[error("no TCP connection within {0:?}")]
    ConnectTimeout(Duration),
    /// The TLS handshake failed (certificate, credential refused; HAProxy:
    /// L6RSP).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// No complete answer within the check timeout: a hung or overloaded
    /// server (HAProxy: L6TOUT/L7TOUT).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer with a status that is not accepted (HAProxy: L7STS).
    #[error("HTTP {0}")]
    Status(u16),
    /// A broken answer: the connection closed mid-answer, malformed or
    /// oversized headers or body (HAProxy: L7RSP).
    #[error("bad answer: {0}")]
    Http(String),
}

/// What the checker believes about a master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not decided yet: fewer than `rise` successes and fewer than `fall`
    /// failures since the start.
    Unknown,
    /// In rotation: the last `rise` (or more) checks succeeded.
    Up {
        /// The accepted status of the last answer (200, or 401/403 in
        /// bootstrap).
        code: u16,
    },
    /// Out of rotation: the last `fall` (or more) checks failed.
    Down(Failure),
}

impl Verdict {
    /// The HTTP status behind the verdict, when one was received.
    pub fn code(&self) -> Option<u16> {
        match self {
            Verdict::Up { code } | Verdict::Down(Failure::Status(code)) => Some(*code),
            _ => None,
        }
    }
    /// True when up.
    pub fn is_up(&self) -> bool {
        matches!(self, Verdict::Up { .. })
    }
    /// True when down.
    pub fn is_down(&self) -> bool {
        matches!(self, Verdict::Down(_))
    }
    /// Same state (up, down, unknown), whatever the code or reason: a
    /// change of reason alone is not a transition.
    fn same_state(&self, other: &Verdict) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
    }
}

/// One master's state as the checker sees it. Watchers are woken only when
/// [`Report::verdict`] changes state; the rest is updated in place.
#[derive(Clone, Debug)]
pub struct Report {
    /// The master's name, as in HAProxy and the status.
    pub name: String,
    /// The current verdict.
    pub verdict: Verdict,
    /// When the verdict last changed state, for "down for 3s".
    pub since: Instant,
    /// The last check's outcome: `Ok((status, latency))` or its failure;
    /// the latency tells a slow answer from a fast one.
    pub last: Option<Result<(u16, Duration), Failure>>,
    /// Checks run.
    pub checks: u64,
    /// TLS handshakes completed: with keep-alive this stays at one per
    /// connection the server kept, which is what saves its CPU.
    pub handshakes: u64,
    /// Connection attempts (TCP), successful or not.
    pub connects: u64,
}

/// The check settings, shared by the checkers of every master of a node.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Time between two checks while a master is stable (`health.interval`).
    pub interval: Duration,
    /// Time between checks while a master is failing or changing state, and
    /// the first delay of connection backoff (HAProxy's `fastinter`).
    pub fastinter: Duration,
    /// How long a check may wait for its complete answer once connected
    /// (`health.timeout`): longer is a hang.
    pub timeout: Duration,
    /// How long TCP connect may take (`min(timeouts.connect, interval)`,
    /// as HAProxy's check).
    pub connect_timeout: Duration,
    /// Consecutive successes that make a master Up.
    pub rise: u32,
    /// Consecutive failures that make a master Down.
    pub fall: u32,
    /// The path requested (`health.path`).
    pub path: String,
    /// Sent as SNI and `Host`, and the name the certificate is verified
    /// against (`health.tls.server_name`).
    pub server_name: String,
    /// Accepted statuses: `health.expect_status`, plus 401 and 403 in
    /// bootstrap (no credential yet), like the rendered `http-check expect`.
    pub accept: Vec<u16>,
    /// The bearer token, when that is the credential (a client certificate
    /// is in the TLS configuration instead).
    pub bearer: Option<Secret>,
    /// Delay before the first check: this node's offset within one
    /// interval ([`phase_for`]).
    pub phase: Duration,
}

impl Settings {
    /// The settings HAProxy's check has for `config` and `inputs`, with a
    /// random phase.
    pub fn from_config(config: &Config, inputs: &Inputs) -> Settings {
        let h = &config.health;
        let accept = inputs.check.accepted_statuses(&h.expect_status);
        let interval = h.interval.std();
        Settings {
            interval,
            fastinter: crate::render::fastinter(h.interval).std(),
            timeout: h.timeout.std(),
            connect_timeout: config.timeouts.connect.std().min(interval),
            rise: h.rise.max(1),
            fall: h.fall.max(1),
            path: h.path.0.clone(),
            server_name: h.tls.server_name().to_owned(),
            accept,
            bearer: match &inputs.check.credential {
                Credential::Bearer { token, .. } => Some(token.clone()),
                _ => None,
            },
            phase: phase_for(&random_seed(), interval),
        }
    }
}

/// A random seed from the standard library's per-process random hasher
/// keys (no dependency needed for one number).
fn random_seed() -> String {
    let s = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    format!("{s:x}")
}

/// A phase offset in `[0, interval)` derived from `seed` (e.g. a random
/// value, or the node name for a reproducible spread).
pub fn phase_for(seed: &str, interval: Duration) -> Duration {
    // FNV-1a: stable across runs and platforms, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let nanos = interval.as_nanos().max(1);
    Duration::from_nanos((u128::from(h) % nanos) as u64)
}

/// Where a master is.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its name (HAProxy's server name).
    pub name: String,
    /// `host:port`, resolved at every connection (a DNS name may move).
    pub address: String,
}

/// A running checker of one master. Dropping it stops the check.
pub struct Checker {
    /// The check loop.
    task: JoinHandle<()>,
    /// The verdict and counters.
    report: watch::Receiver<Report>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Checker {
    /// Starts checking `target` with `settings` over connections made with
    /// `tls` (from [`client_config`], shared by all checkers).
    pub fn spawn(
        target: Target,
        settings: Arc<Settings>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Checker, CheckError> {
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|source| CheckError::ServerName { name: settings.server_name.clone(), source })?;
        let (tx, rx) = watch::channel(Report {
            name: target.name.clone(),
            verdict: Verdict::Unknown,
            since: Instant::now(),
            last: None,
            checks: 0,
            handshakes: 0,
            connects: 0,
        });
        let looper = Loop {
            target,
            settings,
            connector: tokio_rustls::TlsConnector::from(tls),
            server_name,
            tx,
            conn: None,
        };
        Ok(Checker { task: tokio::spawn(looper.run()), report: rx })
    }

    /// A receiver of the report: `changed()` fires on verdict changes.
    pub fn watch(&self) -> watch::Receiver<Report> {
        self.report.clone()
    }

    /// The current report.
    pub fn report(&self) -> Report {
        self.report.borrow().clone()
    }
}

/// A kept-alive connection.
struct Conn {
    /// Sends requests on it.
    sender: SendRequest<Empty<Bytes>>,
    /// Fires when hyper's connection task ends (the server closed it).
    closed: oneshot::Receiver<()>,
}

/// One check's outcome, with whether it ran on a reused connection.
enum Outcome {
    /// An answer: status and latency.
    Answer(u16, Duration),
    /// A failure counted against the master.
    Failed(Failure),
    /// The reused connection was gone before any answer: retry fresh.
    Stale,
}

/// The state of one checker's loop.
struct Loop {
    /// What is checked.
    target: Target,
    /// How.
    settings: Arc<Settings>,
    /// Makes TLS connections with the check's configuration.
    connector: tokio_rustls::TlsConnector,
    /// SNI and verified name.
    server_name: ServerName<'static>,
    /// Publishes the report.
    tx: watch::Sender<Report>,
    /// The kept-alive connection, when there is one.
    conn: Option<Conn>,
}

impl Loop {
    async fn run(mut self) {
        let s = self.settings.clone();
        tokio::time::sleep(s.phase).await;
        let (mut ok_run, mut fail_run) = (0u32, 0u32);
        let mut backoff = s.fastinter;
        loop {
            let started = Instant::now();
            let outcome = self.check().await;
            let connected = self.conn.is_some();
            let result = match outcome {
                Outcome::Answer(code, latency) if s.accept.contains(&code) => Ok((code, latency)),
                Outcome::Answer(code, _) => Err(Failure::Status(code)),
                Outcome::Failed(f) => Err(f),
                Outcome::Stale => Err(Failure::Http("connection closed before the answer".into())),
            };
            match &result {
                Ok(_) => {
                    ok_run += 1;
                    fail_run = 0;
                }
                Err(_) => {
                    fail_run += 1;
                    ok_run = 0;
                }
            }
            let new = match &result {
                Ok((code, _)) if ok_run >= s.rise => Some(Verdict::Up { code: *code }),
                Err(f) if fail_run >= s.fall => Some(Verdict::Down(f.clone())),
                _ => None,
            };
            self.publish(result, new);

            // Next check: fastinter while failing or changing state; on a
            // connection failure, back off from fastinter to interval.
            let verdict = self.tx.borrow().verdict.clone();
            let settled = (verdict.is_up() && fail_run == 0) || (verdict.is_down() && ok_run == 0);
            let delay = if !connected {
                let d = backoff;
                backoff = (backoff * 2).min(s.interval);
                d
            } else {
                backoff = s.fastinter;
                // A settled master (up, or down and still failing) is
                // checked every interval, as HAProxy does without
                // `downinter`: a failing server gets no extra load.
                if settled { s.interval } else { s.fastinter }
            };
            let next = started + delay;
            // A kept connection closing early pulls the next check forward,
            // but never sooner than fastinter after this one.
            let early = (started + s.fastinter).max(Instant::now());
            let closed = match self.conn.as_mut() {
                Some(conn) => tokio::select! {
                    () = tokio::time::sleep_until(next) => false,
                    _ = &mut conn.closed => true,
                },
                None => {
                    tokio::time::sleep_until(next).await;
                    false
                }
            };
            if closed {
                // Gone: the next check connects afresh (and the spent
                // receiver is never polled again).
                self.conn = None;
                tokio::time::sleep_until(early.min(next)).await;
            }
        }
    }

    /// Updates the report: counters silently, the verdict with a wake-up
    /// when its state changes.
    fn publish(&self, last: Result<(u16, Duration), Failure>, new: Option<Verdict>) {
        self.tx.send_if_modified(|r| {
            r.checks += 1;
            r.last = Some(last);
            match new {
                Some(v) if !v.same_state(&r.verdict) => {
                    r.verdict = v;
                    r.since = Instant::now();
                    true
                }
                Some(v) => {
                    // Same state: keep the latest code or reason, quietly.
                    r.verdict = v;
                    false
                }
                None => false,
            }
        });
    }

    /// One check: on the kept connection if there is one, retried once on
    /// a fresh connection when the kept one turns out to be gone.
    async fn check(&mut self) -> Outcome {
        if let Some(conn) = self.conn.as_mut() {
            if conn.sender.is_closed() {
                self.conn = None;
            } else {
                match self.request().await {
                    Outcome::Stale => self.conn = None,
                    other => return other,
                }
            }
        }
        if let Err(f) = self.connect().await {
            return Outcome::Failed(f);
        }
        match self.request().await {
            Outcome::Stale => {
                Outcome::Failed(Failure::Http("the connection closed before the answer".into()))
            }
            other => other,
        }
    }

    /// Opens a TCP + TLS connection within the limits and keeps it.
    async fn connect(&mut self) -> Result<(), Failure> {
        let s = &self.settings;
        self.tx.send_if_modified(|r| {
            r.connects += 1;
            false
        });
        let tcp = tokio::time::timeout(s.connect_timeout, TcpStream::connect(self.target.address.as_str()))
            .await
            .map_err(|_| Failure::ConnectTimeout(s.connect_timeout))?
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(s.timeout, self.connector.connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| Failure::Timeout(s.timeout))?
            .map_err(|e| Failure::Tls(e.to_string()))?;
        self.tx.send_if_modified(|r| {
            r.handshakes += 1;
            false
        });
        let handshake = hyper::client::conn::http1::Builder::new()
            .max_headers(MAX_HEADERS)
            .max_header_size(MAX_HEADER_BYTES)
            .max_buf_size(MAX_HEADER_BYTES.max(8192))
            .handshake(TokioIo::new(tls));
        let (sender, connection) = tokio::time::timeout(s.timeout, handshake)
            .await
            .map_err(|_| Failure::Timeout(s.timeout))?
            .map_err(|e| Failure::Http(e.to_string()))?;
        let (closed_tx, closed) = oneshot::channel();
        tokio::spawn(async move {
            let _ = connection.await;
            let _ = closed_tx.send(());
        });
        self.conn = Some(Conn { sender, closed });
        Ok(())
    }

    /// Sends the request on the kept connection and reads the answer
    /// within the timeout. A timeout or a broken answer drops the
    /// connection (HTTP/1.1 cannot reuse it).
    async fn request(&mut self) -> Outcome {
        let s = self.settings.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Outcome::Stale;
        };
        let mut req = Request::get(s.path.as_str())
            .header(hyper::header::HOST, s.server_name.as_str())
            .header(hyper::header::USER_AGENT, concat!("apilb-check/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &s.bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        let req = match req.body(Empty::new()) {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(Failure::Http(e.to_string())),
        };
        let started = Instant::now();
        let exchange = async {
            let resp = match conn.sender.send_request(req).await {
                Ok(r) => r,
                // Nothing was answered: the connection was already gone
                // (a closed idle connection) or broke before the head.
                Err(e) if e.is_canceled() || e.is_closed() || e.is_incomplete_message() => {
                    return Outcome::Stale;
                }
                Err(e) => return Outcome::Failed(Failure::Http(e.to_string())),
            };
            let code = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut read = 0usize;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        read += f.data_ref().map_or(0, |d| d.len());
                        if read > MAX_BODY_BYTES {
                            return Outcome::Failed(Failure::Http(format!(
                                "body larger than {MAX_BODY_BYTES} bytes"
                            )));
                        }
                    }
                    Err(e) => return Outcome::Failed(Failure::Http(e.to_string())),
                }
            }
            Outcome::Answer(code, started.elapsed())
        };
        match tokio::time::timeout(s.timeout, exchange).await {
            Ok(Outcome::Answer(code, latency)) => Outcome::Answer(code, latency),
            Ok(other) => {
                self.conn = None;
                other
            }
            Err(_) => {
                self.conn = None;
                Outcome::Failed(Failure::Timeout(s.timeout))
            }
        }
    }
}
