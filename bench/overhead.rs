//! Overhead: latency and throughput of TLS requests straight to a master,
//! through apilb's HAProxy, through the baseline's, and through nginx's
//! stream proxy when it is installed.

use std::time::Duration;

use apilb_testkit::lab::{Lab, LabOptions};
use apilb_testkit::testapi::Session;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clients::Target;
use crate::lbs::{Apilb, Baseline, Nginx};
use crate::report::{latency, table};

/// How many samples and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Rounds over every path.
    pub rounds: usize,
    /// Sequential new connections timed one by one.
    pub connections: usize,
    /// Sequential requests on one connection timed one by one.
    pub requests: usize,
    /// Concurrent clients for the throughput runs.
    pub concurrency: usize,
    /// Length of each throughput run.
    pub duration: Duration,
}

async fn connect(t: &Target) -> Result<Session, String> {
    Session::connect(t.addr, t.tls.clone(), Some(&t.token)).await
}

/// One round of measurements through one path.
#[derive(Default)]
struct Round {
    conn_lat: Vec<Duration>,
    req_lat: Vec<Duration>,
    conn_rate: f64,
    req_rate: f64,
}

/// Latencies and throughputs through `t`, once.
async fn measure(t: &Target, sizes: Sizes) -> Result<Round, String> {
    // Warm up (TLS session caches, HAProxy's checks settled).
    for _ in 0..20 {
        connect(t).await?.served_by().await?;
    }
    let mut round = Round::default();
    for _ in 0..sizes.connections {
        let s = Instant::now();
        connect(t).await?.served_by().await?;
        round.conn_lat.push(s.elapsed());
    }
    let mut session = connect(t).await?;
    for _ in 0..sizes.requests {
        let s = Instant::now();
        session.served_by().await?;
        round.req_lat.push(s.elapsed());
    }
    // Closed loops: each client starts its next request when one ends.
    let deadline = Instant::now() + sizes.duration;
    let mut set = JoinSet::new();
    for _ in 0..sizes.concurrency {
        let t = t.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                connect(&t).await?.served_by().await?;
                n += 1;
            }
            Ok::<u64, String>(n)
        });
    }
    let mut conns = 0;
    while let Some(r) = set.join_next().await {
        conns += r.map_err(|e| e.to_string())??;
    }
    let deadline = Instant::now() + sizes.duration;
    for _ in 0..sizes.concurrency {
        let t = t.clone();
        set.spawn(async move {
            let mut s = connect(&t).await?;
            let mut n = 0u64;
            while Instant::now() < deadline {
                s.served_by().await?;
                n += 1;
            }
            Ok::<u64, String>(n)
        });
    }
    let mut reqs = 0;
    while let Some(r) = set.join_next().await {
        reqs += r.map_err(|e| e.to_string())??;
    }
    let secs = sizes.duration.as_secs_f64();
    round.conn_rate = conns as f64 / secs;
    round.req_rate = reqs as f64 / secs;
    Ok(round)
}

/// Median and range of the rounds' rates.
fn rates(mut v: Vec<f64>) -> (Value, String) {
    v.sort_by(f64::total_cmp);
    let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
    let (min, max) = (v.first().copied().unwrap_or(0.0), v.last().copied().unwrap_or(0.0));
    (
        json!({"median": median.round(), "min": min.round(), "max": max.round(), "rounds": v.len()}),
        format!("{median:.0} ({min:.0}–{max:.0})"),
    )
}

/// The rounds of one path: latencies pooled, rates as median and range.
fn summarize(rounds: Vec<Round>) -> (Value, Vec<String>) {
    let conn_lat = rounds.iter().flat_map(|r| r.conn_lat.iter().copied()).collect();
    let req_lat = rounds.iter().flat_map(|r| r.req_lat.iter().copied()).collect();
    let (conn_json, conn_text) = latency(conn_lat);
    let (req_json, req_text) = latency(req_lat);
    let (conn_rate, conn_rate_text) = rates(rounds.iter().map(|r| r.conn_rate).collect());
    let (req_rate, req_rate_text) = rates(rounds.iter().map(|r| r.req_rate).collect());
    (
        json!({
            "new_connection_latency": conn_json,
            "request_latency": req_json,
            "new_connections_per_s": conn_rate,
            "requests_per_s": req_rate,
        }),
        vec![conn_text, conn_rate_text, req_text, req_rate_text],
    )
}

/// Every path, on one lab of 3 masters, in interleaved rounds (so a slow
/// moment of this shared machine does not land on one path only).
pub async fn bench(sizes: Sizes) -> Value {
    println!(
        "## overhead: TLS requests (GET /version) direct and through each proxy\n\n\
         {} rounds, the paths interleaved. Latency: {} new connections (TCP + TLS + request) one at a time, \
         and {} requests one at a time on one connection, per round, pooled over the rounds. Throughput: {} \
         concurrent clients for {:?}, opening a connection per request, then keeping one each: the median \
         round, and the range. Clients, proxy and servers share this machine's CPUs.\n",
        sizes.rounds, sizes.connections, sizes.requests, sizes.concurrency, sizes.duration
    );
    let lab = match Lab::start(LabOptions::default()).await {
        Ok(l) => l,
        Err(e) => {
            println!("cannot start the lab: {e}");
            return json!({"error": e.to_string()});
        }
    };
    let tls = match lab.client_tls() {
        Ok(t) => t,
        Err(e) => return json!({"error": e.to_string()}),
    };
    let target = |addr| Target { addr, tls: tls.clone(), token: lab.token.clone() };
    let mut errors = Vec::new();
    let apilb = Apilb::start(&lab, "").await.map_err(|e| errors.push(("apilb (HAProxy)", e))).ok();
    let baseline = Baseline::start(&lab).await.map_err(|e| errors.push(("baseline (HAProxy)", e))).ok();
    let nginx = match Nginx::binary() {
        Some(bin) => Nginx::start(&lab, &bin).await.map_err(|e| errors.push(("nginx stream", e))).ok(),
        None => {
            println!("nginx is not installed: its row is skipped (scripts/bench installs it when it can)\n");
            None
        }
    };
    let mut paths = vec![("direct to one master", target(lab.servers[0].addr()))];
    paths.extend(apilb.as_ref().map(|lb| ("apilb (HAProxy)", target(lb.addr))));
    paths.extend(baseline.as_ref().map(|lb| ("baseline (HAProxy)", target(lb.addr))));
    paths.extend(nginx.as_ref().map(|lb| ("nginx stream", target(lb.addr))));
    let mut rounds: Vec<Result<Vec<Round>, String>> = paths.iter().map(|_| Ok(Vec::new())).collect();
    for _ in 0..sizes.rounds {
        for (i, (_, t)) in paths.iter().enumerate() {
            if let Ok(done) = &mut rounds[i] {
                match measure(t, sizes).await {
                    Ok(r) => done.push(r),
                    Err(e) => rounds[i] = Err(e),
                }
            }
        }
    }
    if let Some(lb) = apilb {
        lb.stop().await;
    }
    drop((baseline, nginx));
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for ((name, _), r) in paths.iter().zip(rounds) {
        match r {
            Ok(r) => {
                let (mut json, cells) = summarize(r);
                json["path"] = json!(name);
                results.push(json);
                rows.push(std::iter::once(name.to_string()).chain(cells).collect());
            }
            Err(e) => errors.push((name, e)),
        }
    }
    for (name, e) in errors {
        println!("{name}: failed: {e}");
        results.push(json!({"path": name, "error": e}));
    }
    println!(
        "{}",
        table(
            &[
                "path",
                "new connection p50 / p99",
                "new connections/s",
                "request on an open connection p50 / p99",
                "requests/s",
            ],
            &rows
        )
    );
    json!({
        "settings": {
            "rounds": sizes.rounds,
            "connections": sizes.connections,
            "requests": sizes.requests,
            "concurrency": sizes.concurrency,
            "duration_ms": crate::report::ms(sizes.duration),
        },
        "runs": results,
    })
}
