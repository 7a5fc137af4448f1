//! Overhead: latency and throughput of TLS requests straight to a master,
//! through apilb's HAProxy, through the baseline's, and through nginx's
//! stream proxy when it is installed.

use std::time::Duration;

use apilb::lab::{Lab, LabOptions};
use apilb::testapi::Session;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::clients::Target;
use crate::lbs::{Apilb, Baseline, Nginx};
use crate::report::{latency, table};

/// How many samples and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
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

/// Latencies and throughputs through `t`.
async fn measure(t: &Target, sizes: Sizes) -> Result<(Value, Vec<String>), String> {
    // Warm up (TLS session caches, HAProxy's checks settled).
    for _ in 0..20 {
        connect(t).await?.served_by().await?;
    }
    let mut conn_lat = Vec::with_capacity(sizes.connections);
    for _ in 0..sizes.connections {
        let s = Instant::now();
        connect(t).await?.served_by().await?;
        conn_lat.push(s.elapsed());
    }
    let mut session = connect(t).await?;
    let mut req_lat = Vec::with_capacity(sizes.requests);
    for _ in 0..sizes.requests {
        let s = Instant::now();
        session.served_by().await?;
        req_lat.push(s.elapsed());
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
    let (conn_json, conn_text) = latency(conn_lat);
    let (req_json, req_text) = latency(req_lat);
    let (conn_rate, req_rate) = (conns as f64 / secs, reqs as f64 / secs);
    Ok((
        json!({
            "new_connection_latency": conn_json,
            "request_latency": req_json,
            "new_connections_per_s": conn_rate.round(),
            "requests_per_s": req_rate.round(),
        }),
        vec![conn_text, format!("{conn_rate:.0}"), req_text, format!("{req_rate:.0}")],
    ))
}

/// Every path, on one lab of 3 masters.
pub async fn bench(sizes: Sizes) -> Value {
    println!(
        "## overhead: TLS requests (GET /version) direct and through each proxy\n\n\
         Latency: {} new connections (TCP + TLS + request) one at a time, and {} requests one at a time on \
         one connection. Throughput: {} concurrent clients for {:?}, opening a connection per request, \
         then keeping one each. Clients, proxy and servers share this machine's CPUs.\n",
        sizes.connections, sizes.requests, sizes.concurrency, sizes.duration
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
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut record = |name: &str, r: Result<(Value, Vec<String>), String>| match r {
        Ok((mut json, cells)) => {
            json["path"] = json!(name);
            results.push(json);
            let mut row = vec![name.to_owned()];
            row.extend(cells);
            rows.push(row);
        }
        Err(e) => {
            println!("{name}: failed: {e}");
            results.push(json!({"path": name, "error": e}));
        }
    };

    record("direct to one master", measure(&target(lab.servers[0].addr()), sizes).await);
    match Apilb::start(&lab, "").await {
        Ok(lb) => {
            record("apilb (HAProxy)", measure(&target(lb.addr), sizes).await);
            lb.stop().await;
        }
        Err(e) => record("apilb (HAProxy)", Err(e)),
    }
    match Baseline::start(&lab).await {
        Ok(lb) => {
            record("baseline (HAProxy)", measure(&target(lb.addr), sizes).await);
            lb.stop();
        }
        Err(e) => record("baseline (HAProxy)", Err(e)),
    }
    match Nginx::binary() {
        Some(bin) => match Nginx::start(&lab, &bin).await {
            Ok(lb) => {
                record("nginx stream", measure(&target(lb.addr), sizes).await);
                lb.stop();
            }
            Err(e) => record("nginx stream", Err(e)),
        },
        None => {
            println!("nginx is not installed: its row is skipped (scripts/bench installs it when it can)\n")
        }
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
            "connections": sizes.connections,
            "requests": sizes.requests,
            "concurrency": sizes.concurrency,
            "duration_ms": crate::report::ms(sizes.duration),
        },
        "runs": results,
    })
}
