//! Failover: one master fails under load; what do clients see, and how long
//! until every new connection succeeds again? Each scenario runs against
//! apilb and against the baseline, on fresh test servers; crash, hang and
//! readyz 503 also against apilb with the persistent checker (issue 15).

use std::collections::BTreeMap;
use std::time::Duration;

use apilb_testkit::lab::{Lab, LabOptions};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::clients::{Attempt, LongLived, NewConnections, Target, examples, kinds};
use crate::lbs::{Lb, LbKind};
use crate::netns::NetNs;
use crate::report::{ms, table};

/// How one master fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The process dies: its connections are reset, new ones refused.
    Crash,
    /// The process stops answering (SIGSTOP, a deadlock): the kernel still
    /// accepts connections, nothing is read or written.
    Hang,
    /// It answers, but `/readyz` says 503 (etcd unreachable, shutting
    /// down); a client served by it gets errors in real life.
    NotReady,
    /// Its host drops off the network: packets vanish.
    Blackhole,
}

impl Fault {
    /// Every scenario, in table order.
    pub const ALL: [Fault; 4] = [Fault::Crash, Fault::Hang, Fault::NotReady, Fault::Blackhole];

    /// The load balancers this scenario runs against: the persistent
    /// checker in the scenarios of issue 15's done-when (crash, hang, 503).
    fn systems(self) -> &'static [LbKind] {
        match self {
            Fault::Blackhole => &LbKind::BOTH,
            _ => &LbKind::FAILOVER,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::Crash => "crash",
            Fault::Hang => "hang",
            Fault::NotReady => "readyz 503",
            Fault::Blackhole => "blackhole",
        }
    }
}

/// The load and the observation window.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// New connections per second.
    pub rate: u32,
    /// Long-lived connections.
    pub long_lived: usize,
    /// How often each long-lived client sends a request.
    pub period: Duration,
    /// Load before the fault.
    pub warmup: Duration,
    /// Load after the fault.
    pub window: Duration,
}

/// The failures among `attempts`, seen from the fault at `fault`:
/// attempts still running at the fault or started after it count; an
/// answer from the failed master after the fault counts as a failure
/// (in the 503 case that master is not ready to serve).
struct Outcome {
    total: usize,
    failed: usize,
    kinds: BTreeMap<&'static str, u64>,
    examples: BTreeMap<&'static str, String>,
    /// The longest a failed attempt kept its client waiting.
    longest_stall: Duration,
    /// When the last failing attempt started, from the fault; `None` when
    /// attempts were still failing at the end of the window.
    recovered: Option<Duration>,
}

fn outcome<'a>(
    attempts: impl IntoIterator<Item = &'a Attempt>,
    fault: Instant,
    end: Instant,
    victim: &str,
) -> Outcome {
    let mut total = 0;
    let mut errors = Vec::new();
    let mut last_failure: Option<Instant> = None;
    let mut longest_stall = Duration::ZERO;
    for a in attempts.into_iter().filter(|a| a.end >= fault) {
        total += 1;
        let error = match &a.outcome {
            Err(e) => Some(e.clone()),
            Ok(server) if server == victim && a.start >= fault => Some(format!("served by {server}")),
            Ok(_) => None,
        };
        if let Some(e) = error {
            errors.push(e);
            last_failure = last_failure.max(Some(a.start));
            longest_stall = longest_stall.max(a.end - a.start);
        }
    }
    let recovered = match last_failure {
        None => Some(Duration::ZERO),
        // Failures up to the last second of the window: not recovered.
        Some(t) if t + Duration::from_secs(1) >= end => None,
        Some(t) => Some(t.saturating_duration_since(fault)),
    };
    Outcome {
        total,
        failed: errors.len(),
        kinds: kinds(errors.iter().map(String::as_str)),
        examples: examples(errors.iter().map(String::as_str)),
        longest_stall,
        recovered,
    }
}

impl Outcome {
    fn json(&self) -> Value {
        json!({
            "total": self.total,
            "failed": self.failed,
            "failures_by_kind": self.kinds,
            "failure_examples": self.examples,
            "longest_failed_attempt_ms": ms(self.longest_stall),
            "recovered_after_ms": self.recovered.map(ms),
        })
    }

    fn failed_cell(&self) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        if kinds.is_empty() {
            format!("0 / {}", self.total)
        } else {
            format!("{} / {} ({})", self.failed, self.total, kinds.join(", "))
        }
    }

    fn stall_cell(&self) -> String {
        if self.failed == 0 { "-".into() } else { format!("{:.1} s", self.longest_stall.as_secs_f64()) }
    }

    fn recovered_cell(&self) -> String {
        match self.recovered {
            _ if self.failed == 0 => "never failed".into(),
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => "not within the window".into(),
        }
    }
}

/// One scenario against one load balancer.
async fn run(fault: Fault, kind: LbKind, sizes: Sizes) -> Result<(Value, Vec<String>), String> {
    let masters = if fault == Fault::Blackhole { 2 } else { 3 };
    let mut lab =
        Lab::start(LabOptions { masters, ..LabOptions::default() }).await.map_err(|e| e.to_string())?;
    // The black-holed master lives in a network namespace.
    let netns = if fault == Fault::Blackhole {
        let ns = NetNs::create()?;
        let listener = ns.bind().map_err(|e| format!("bind in the namespace: {e}"))?;
        lab.add_server_on("master-3", listener).map_err(|e| e.to_string())?;
        Some(ns)
    } else {
        None
    };
    let victim = if fault == Fault::Blackhole { lab.servers.len() - 1 } else { 0 };
    let victim_name = lab.servers[victim].name().to_owned();
    let lb = Lb::start(kind, &mut lab).await?;
    let target = Target {
        addr: lb.addr(),
        tls: lab.client_tls().map_err(|e| e.to_string())?,
        token: lab.token.clone(),
    };
    let long = LongLived::start(target.clone(), sizes.long_lived, sizes.period).await?;
    let news = NewConnections::start(target, sizes.rate);
    tokio::time::sleep(sizes.warmup).await;
    match fault {
        Fault::Crash => lab.servers[victim].crash(),
        Fault::Hang => lab.servers[victim].hang(),
        Fault::NotReady => lab.servers[victim].set_readyz(503),
        Fault::Blackhole => netns.as_ref().ok_or("no namespace")?.blackhole(true)?,
    }
    // Once in effect: `ip route` takes a few milliseconds, during which a
    // new connection still reaches the black-holed master and succeeds.
    let at = Instant::now();
    tokio::time::sleep(sizes.window).await;
    let end = Instant::now();
    let (attempts, long) = tokio::join!(news.stop(), long.stop());
    lb.stop().await;
    drop(netns);

    let new = outcome(&attempts, at, end, &victim_name);
    let requests = outcome(long.iter().flat_map(|c| &c.requests), at, end, &victim_name);
    let hit = long.iter().filter(|c| outcome(&c.requests, at, end, &victim_name).failed > 0).count();
    let reconnects: usize = long.iter().map(|c| c.reconnects.iter().filter(|t| **t >= at).count()).sum();
    let json = json!({
        "scenario": fault.name(),
        "lb": kind.name(),
        "new_connections": new.json(),
        "long_lived": {
            "clients": long.len(),
            "clients_with_a_failed_request": hit,
            "reconnects_after_close": reconnects,
            "requests": requests.json(),
        },
    });
    let row = vec![
        fault.name().to_owned(),
        kind.name().to_owned(),
        new.failed_cell(),
        new.stall_cell(),
        new.recovered_cell(),
        format!("{hit} / {}", long.len()),
        requests.failed_cell(),
        requests.stall_cell(),
        requests.recovered_cell(),
    ];
    Ok((json, row))
}

/// Every scenario against its load balancers ([`Fault::systems`]).
pub async fn bench(sizes: Sizes, filter: &dyn Fn(&str) -> bool) -> Value {
    println!(
        "## failover: one of 3 masters fails under load\n\n\
         {} new connections/s (TCP + TLS + GET /version) and {} long-lived connections with one request \
         each per {:?}; clients give up after {:?}. The fault comes after {:?}; the window is {:?}.\n",
        sizes.rate,
        sizes.long_lived,
        sizes.period,
        crate::clients::CLIENT_TIMEOUT,
        sizes.warmup,
        sizes.window
    );
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for fault in Fault::ALL {
        if !filter(fault.name()) {
            continue;
        }
        if fault == Fault::Blackhole
            && let Err(e) = NetNs::create()
        {
            let why = format!("blackhole skipped: this machine does not allow a network namespace ({e})");
            println!("{why}\n");
            skipped.push(why);
            continue;
        }
        for &kind in fault.systems() {
            match run(fault, kind, sizes).await {
                Ok((json, row)) => {
                    results.push(json);
                    rows.push(row);
                }
                Err(e) => {
                    println!("{} / {}: failed to run: {e}", fault.name(), kind.name());
                    results.push(json!({"scenario": fault.name(), "lb": kind.name(), "error": e}));
                }
            }
        }
    }
    println!(
        "{}",
        table(
            &[
                "scenario",
                "lb",
                "new connections failed",
                "longest wait of a failed one",
                "every new connection succeeds after",
                "long-lived clients hit",
                "long-lived requests failed",
                "longest wait of a failed one",
                "every request succeeds after",
            ],
            &rows
        )
    );
    json!({
        "settings": {
            "new_connections_per_s": sizes.rate,
            "long_lived": sizes.long_lived,
            "long_lived_period_ms": ms(sizes.period),
            "client_timeout_ms": ms(crate::clients::CLIENT_TIMEOUT),
            "warmup_ms": ms(sizes.warmup),
            "window_ms": ms(sizes.window),
        },
        "skipped": skipped,
        "runs": results,
    })
}
