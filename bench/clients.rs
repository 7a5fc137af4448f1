//! The benchmark's clients: an open-loop stream of new connections and a
//! crowd of long-lived ones, both recording every attempt with its timing,
//! so a run can be cut at the moment of a fault afterwards.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use apilb_testkit::testapi::Session;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Where the clients connect and how they authenticate.
#[derive(Clone)]
pub struct Target {
    /// The load balancer's frontend (or a server, for the direct baseline).
    pub addr: SocketAddr,
    /// Verifies the servers' certificate (SNI `kubernetes`).
    pub tls: Arc<rustls::ClientConfig>,
    /// The bearer token the servers accept.
    pub token: String,
}

/// One request: a new connection's whole life, or one request on a
/// long-lived connection.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// When it started.
    pub start: Instant,
    /// When it ended (answered, failed or timed out).
    pub end: Instant,
    /// The master that answered, or why it failed.
    pub outcome: Result<String, String>,
}

/// What a client waits for an answer before it gives up: client-go's TLS
/// handshake timeout, which is also kubelet's request timeout.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

async fn one_connection(t: &Target) -> Attempt {
    let start = Instant::now();
    let outcome = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut s = Session::connect(t.addr, t.tls.clone(), Some(&t.token)).await?;
        s.served_by().await
    })
    .await
    .unwrap_or_else(|_| Err(format!("timeout: no answer within {CLIENT_TIMEOUT:?}")));
    Attempt { start, end: Instant::now(), outcome }
}

/// New connections at a fixed rate (open loop: a slow answer does not slow
/// the arrivals), each one TCP + TLS + `GET /version`, like kubelets and
/// controllers reconnecting.
pub struct NewConnections {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<Attempt>>,
}

impl NewConnections {
    /// Starts `rate` connections per second against `target`.
    pub fn start(target: Target, rate: u32) -> NewConnections {
        let (stop, mut rx) = watch::channel(false);
        let period = Duration::from_secs(1) / rate.max(1);
        let task = tokio::spawn(async move {
            let mut inflight = JoinSet::new();
            let mut done = Vec::new();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let t = target.clone();
                        inflight.spawn(async move { one_connection(&t).await });
                    }
                    Some(Ok(a)) = inflight.join_next(), if !inflight.is_empty() => done.push(a),
                    _ = rx.changed() => break,
                }
            }
            // Every attempt in flight ends by itself within CLIENT_TIMEOUT.
            while let Some(a) = inflight.join_next().await {
                done.extend(a.ok());
            }
            done.sort_by_key(|a| a.start);
            done
        });
        NewConnections { stop, task }
    }

    /// Stops new arrivals, waits for those in flight, returns every attempt.
    pub async fn stop(self) -> Vec<Attempt> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or_default()
    }
}

/// One long-lived client's record.
#[derive(Clone, Debug, Default)]
pub struct LongLivedReport {
    /// Every request it sent, in order.
    pub requests: Vec<Attempt>,
    /// When it found its connection closed by the other side and opened a
    /// new one (a closed idle connection costs a client nothing but the
    /// reconnect; client-go retries such a GET on a new connection).
    pub reconnects: Vec<Instant>,
}

/// Clients holding one connection each and sending a request on it every
/// `period`, like kubelets and controllers on their persistent
/// connections. A client whose request fails or times out drops the
/// connection and opens a new one.
pub struct LongLived {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<LongLivedReport>>,
    target: Target,
    period: Duration,
}

impl LongLived {
    /// Opens `n` connections (returns once all are open and answered).
    pub async fn start(target: Target, n: usize, period: Duration) -> Result<LongLived, String> {
        let (stop, _) = watch::channel(false);
        let mut ll = LongLived { stop, tasks: Vec::new(), target, period };
        ll.add(n).await?;
        Ok(ll)
    }

    /// Opens `n` more clients; returns once they are connected.
    pub async fn add(&mut self, n: usize) -> Result<(), String> {
        let mut opening = JoinSet::new();
        for i in 0..n {
            let t = self.target.clone();
            opening.spawn(async move {
                // At most ~32 handshakes at once.
                tokio::time::sleep(Duration::from_millis((i / 32) as u64 * 5)).await;
                Session::connect(t.addr, t.tls.clone(), Some(&t.token)).await
            });
        }
        while let Some(s) = opening.join_next().await {
            let session = s.map_err(|e| e.to_string())??;
            let i = self.tasks.len();
            let rx = self.stop.subscribe();
            let (t, period) = (self.target.clone(), self.period);
            // Spread the clients over the period.
            let offset = period.mul_f64((i % 97) as f64 / 97.0);
            self.tasks.push(tokio::spawn(client_loop(t, session, period, offset, rx)));
        }
        Ok(())
    }

    /// How many clients there are.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Stops every client (each finishes its request in flight).
    pub async fn stop(self) -> Vec<LongLivedReport> {
        let _ = self.stop.send(true);
        let mut out = Vec::new();
        for t in self.tasks {
            out.extend(t.await.ok());
        }
        out
    }
}

async fn client_loop(
    t: Target,
    session: Session,
    period: Duration,
    offset: Duration,
    mut stop: watch::Receiver<bool>,
) -> LongLivedReport {
    let mut report = LongLivedReport::default();
    let mut session = Some(session);
    let mut next = Instant::now() + offset;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => break,
        }
        next += period;
        let start = Instant::now();
        if session.as_ref().is_some_and(Session::is_closed) {
            report.reconnects.push(start);
            session = None;
        }
        let outcome = tokio::time::timeout(CLIENT_TIMEOUT, async {
            if session.is_none() {
                session = Some(Session::connect(t.addr, t.tls.clone(), Some(&t.token)).await?);
            }
            match session.as_mut() {
                Some(s) => s.served_by().await,
                None => Err("no session".to_owned()),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("timeout: no answer within {CLIENT_TIMEOUT:?}")));
        if outcome.is_err() {
            session = None;
        }
        report.requests.push(Attempt { start, end: Instant::now(), outcome });
        // A request that took longer than the period delays the next one.
        next = next.max(Instant::now());
    }
    report
}

/// The kind of a failure, for the tables: no answer before the client
/// gave up, refused, closed by the other side (reset, EOF in the TLS
/// handshake, connection error mid-request), an answer from the failed
/// master, or anything else.
pub fn failure_kind(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.starts_with("served by") {
        "answered by the failed master"
    } else if e.contains("timeout") || e.contains("timed out") {
        "timeout"
    } else if e.contains("refused") {
        "refused"
    } else if ["reset", "closed", "eof", "broken pipe", "connection error"].iter().any(|k| e.contains(k)) {
        "closed"
    } else {
        "other"
    }
}

/// Failures by kind.
pub fn kinds<'a>(errors: impl IntoIterator<Item = &'a str>) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for e in errors {
        *m.entry(failure_kind(e)).or_default() += 1;
    }
    m
}

/// The first error message of each kind, for the JSON.
pub fn examples<'a>(errors: impl IntoIterator<Item = &'a str>) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    for e in errors {
        m.entry(failure_kind(e)).or_insert_with(|| e.to_owned());
    }
    m
}
