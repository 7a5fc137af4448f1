//! Many long-lived connections at once, for the reliability tests and the
//! benchmarks: a [`Pool`] opens N [`Session`]s with bounded parallelism and
//! keeps them open (like a node's watches), then [`Pool::probe`] asks every
//! one of them for `/version` at the same time and counts how many still
//! answer, how many were closed and how many failed otherwise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Session;

/// How many sample errors a report keeps.
const SAMPLES: usize = 5;

/// Where and how a [`Pool`] connects.
#[derive(Clone)]
pub struct PoolOptions {
    /// The address to connect to (a load balancer's frontend or a server).
    pub addr: SocketAddr,
    /// TLS settings of the clients (SNI `kubernetes`).
    pub tls: Arc<rustls::ClientConfig>,
    /// Bearer token sent with every request, if any.
    pub token: Option<String>,
    /// At most this many connections are being opened at once.
    pub parallelism: usize,
    /// Time allowed to open one connection (TCP, TLS, HTTP and the first
    /// `/version`), and to answer one probe.
    pub timeout: Duration,
}

/// One held connection and the master that answered it when it opened.
struct Held {
    session: Session,
    server: String,
}

/// Long-lived connections held open. Dropping the pool closes them.
pub struct Pool {
    held: Vec<Held>,
    opts: PoolOptions,
}

/// What opening a pool did.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    /// Connections opened and answered `/version` with 200.
    pub opened: usize,
    /// Connections that could not be opened (or did not answer).
    pub failed: usize,
    /// The first few errors, for diagnosis.
    pub errors: Vec<String>,
    /// Opened connections per serving master.
    pub by_server: BTreeMap<String, usize>,
    /// How long opening took, from the first connect to the last answer.
    pub took: Duration,
}

/// The outcome of [`Pool::probe`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeReport {
    /// Connections that answered `/version` with 200.
    pub ok: usize,
    /// Connections closed by the other side (before or during the probe).
    pub closed: usize,
    /// Connections that are open but did not answer properly: an error
    /// status, another master than the one that served them first, or no
    /// answer within the timeout.
    pub failed: usize,
    /// The first few errors of `closed` and `failed` connections.
    pub errors: Vec<String>,
    /// Connections that answered, per serving master.
    pub by_server: BTreeMap<String, usize>,
}

impl ProbeReport {
    /// Connections probed.
    pub fn total(&self) -> usize {
        self.ok + self.closed + self.failed
    }

    /// True when every connection answered.
    pub fn all_ok(&self) -> bool {
        self.closed == 0 && self.failed == 0
    }
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ok, {} closed, {} failed", self.ok, self.closed, self.failed)?;
        if !self.by_server.is_empty() {
            write!(f, " (ok by master: {:?})", self.by_server)?;
        }
        if !self.errors.is_empty() {
            write!(f, "; e.g. {:?}", self.errors)?;
        }
        Ok(())
    }
}

enum Outcome {
    Ok(String),
    Closed(String),
    Failed(String),
}

impl Pool {
    /// An empty pool connecting with `opts`.
    pub fn new(opts: PoolOptions) -> Pool {
        Pool { held: Vec::new(), opts }
    }

    /// Opens `n` more connections, at most `opts.parallelism` at a time.
    /// Each one asks `/version` once, so it is established end to end and
    /// its master is known. Connections that fail are counted, not kept.
    pub async fn open(&mut self, n: usize) -> OpenReport {
        let started = Instant::now();
        let permits = Arc::new(Semaphore::new(self.opts.parallelism.max(1)));
        let mut tasks = JoinSet::new();
        for _ in 0..n {
            let permits = permits.clone();
            let opts = self.opts.clone();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
                tokio::time::timeout(opts.timeout, async {
                    let mut session = Session::connect(opts.addr, opts.tls, opts.token.as_deref()).await?;
                    let server = session.served_by().await?;
                    Ok(Held { session, server })
                })
                .await
                .unwrap_or_else(|_| Err(format!("not open within {:?}", opts.timeout)))
            });
        }
        let mut report = OpenReport::default();
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(held) => {
                    report.opened += 1;
                    *report.by_server.entry(held.server.clone()).or_default() += 1;
                    self.held.push(held);
                }
                Err(e) => {
                    report.failed += 1;
                    if report.errors.len() < SAMPLES {
                        report.errors.push(e);
                    }
                }
            }
        }
        report.took = started.elapsed();
        report
    }

    /// Connections held (whether or not they are still open).
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when the pool holds no connection.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Connections the other side has closed so far (no request is sent).
    pub fn closed(&self) -> usize {
        self.held.iter().filter(|h| h.session.is_closed()).count()
    }

    /// Sends one `GET /version` on every connection, all at once, each
    /// answer awaited at most `opts.timeout`, and counts the outcomes. A
    /// connection answered by another master than the one that served it
    /// first counts as failed (a TCP proxy never moves a connection).
    pub async fn probe(&mut self) -> ProbeReport {
        let timeout = self.opts.timeout;
        let mut tasks = JoinSet::new();
        for (i, mut held) in std::mem::take(&mut self.held).into_iter().enumerate() {
            tasks.spawn(async move {
                let outcome = if held.session.is_closed() {
                    Outcome::Closed("closed before the probe".into())
                } else {
                    match tokio::time::timeout(timeout, held.session.served_by()).await {
                        Ok(Ok(server)) if server == held.server => Outcome::Ok(server),
                        Ok(Ok(server)) => {
                            Outcome::Failed(format!("opened on {} but answered by {server}", held.server))
                        }
                        Ok(Err(e)) if held.session.is_closed() || is_closed_error(&e) => Outcome::Closed(e),
                        Ok(Err(e)) => Outcome::Failed(e),
                        Err(_) => Outcome::Failed(format!("no answer within {timeout:?}")),
                    }
                };
                (i, held, outcome)
            });
        }
        let mut report = ProbeReport::default();
        let mut back = Vec::with_capacity(tasks.len());
        while let Some(joined) = tasks.join_next().await {
            let Ok((i, held, outcome)) = joined else {
                report.failed += 1;
                continue;
            };
            let error = match outcome {
                Outcome::Ok(server) => {
                    report.ok += 1;
                    *report.by_server.entry(server).or_default() += 1;
                    None
                }
                Outcome::Closed(e) => {
                    report.closed += 1;
                    Some(e)
                }
                Outcome::Failed(e) => {
                    report.failed += 1;
                    Some(e)
                }
            };
            if let Some(e) = error
                && report.errors.len() < SAMPLES
            {
                report.errors.push(e);
            }
            back.push((i, held));
        }
        // Keep the original order, so repeated probes are comparable.
        back.sort_by_key(|(i, _)| *i);
        self.held = back.into_iter().map(|(_, h)| h).collect();
        report
    }

    /// Closes every connection.
    pub fn close(&mut self) {
        self.held.clear();
    }
}

/// hyper's errors when the peer closed the connection.
fn is_closed_error(e: &str) -> bool {
    ["connection closed", "channel closed", "connection reset", "broken pipe", "IncompleteMessage"]
        .iter()
        .any(|needle| e.to_ascii_lowercase().contains(&needle.to_ascii_lowercase()))
}
