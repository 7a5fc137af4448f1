//! Reload disruption: many config changes under load. What do clients
//! lose, how long does a change take, and how many HAProxy processes are
//! left behind?

use std::time::Duration;

use apilb_testkit::lab::{Lab, LabOptions};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::clients::{LongLived, NewConnections, Target, examples, kinds};
use crate::lbs::{Lb, LbKind, children_of, poll};
use crate::report::{latency, ms, table};

/// The load and the number of changes.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Config changes, each applied by a reload.
    pub changes: u32,
    /// New connections per second.
    pub rate: u32,
    /// Long-lived connections opened before the first change.
    pub long_lived: usize,
    /// Long-lived connections opened after each change, as pods and nodes
    /// come and go: they land on that change's worker.
    pub long_lived_per_change: usize,
    /// How often each long-lived client sends a request.
    pub period: Duration,
}

/// HAProxy's master and workers.
fn processes(master: Option<u32>) -> usize {
    master.map(|m| 1 + children_of(m).len()).unwrap_or(0)
}

async fn run(kind: LbKind, sizes: Sizes) -> Result<(Value, Vec<String>), String> {
    let mut lab = Lab::start(LabOptions::default()).await.map_err(|e| e.to_string())?;
    let lb = Lb::start(kind, &mut lab).await?;
    let target = Target {
        addr: lb.addr(),
        tls: lab.client_tls().map_err(|e| e.to_string())?,
        token: lab.token.clone(),
    };
    let mut long = LongLived::start(target.clone(), sizes.long_lived, sizes.period).await?;
    let news = NewConnections::start(target, sizes.rate);
    let start = Instant::now();
    let mut times = Vec::new();
    let mut errors = Vec::new();
    for i in 0..sizes.changes {
        let t = Instant::now();
        match lb.change(&lab, i + 1).await {
            Ok(()) => times.push(t.elapsed()),
            Err(e) => errors.push(e),
        }
        long.add(sizes.long_lived_per_change).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let duration = start.elapsed();
    let master = lb.haproxy_pid();
    let after_changes = processes(master);
    let pss_kib = master.map(crate::footprint::haproxy_pss_kib).unwrap_or(0);
    let end = Instant::now();
    let clients = long.len();
    let (attempts, long) = tokio::join!(news.stop(), long.stop());
    // Once every client has gone, old workers have nothing left to serve.
    let after_clients = poll(Duration::from_secs(5), "old workers to exit", || async {
        let n = processes(master);
        (n <= 2).then_some(n)
    })
    .await
    .unwrap_or_else(|_| processes(master));
    lb.stop().await;
    drop(lab);

    let failed_new: Vec<&str> =
        attempts.iter().filter_map(|a| a.outcome.as_ref().err()).map(String::as_str).collect();
    let requests: Vec<_> = long.iter().flat_map(|c| &c.requests).filter(|a| a.start <= end).collect();
    let failed_long: Vec<&str> =
        requests.iter().filter_map(|a| a.outcome.as_ref().err()).map(String::as_str).collect();
    let reconnects: usize = long.iter().map(|c| c.reconnects.len()).sum();
    let (reload_json, reload_text) = latency(times);
    let cell = |failed: &[&str], total: usize| {
        let k: Vec<String> = kinds(failed.iter().copied()).iter().map(|(k, n)| format!("{n} {k}")).collect();
        if k.is_empty() {
            format!("0 / {total}")
        } else {
            format!("{} / {total} ({})", failed.len(), k.join(", "))
        }
    };
    let json = json!({
        "lb": kind.name(),
        "changes": sizes.changes,
        "changes_refused": errors,
        "duration_ms": ms(duration),
        "change_applied": reload_json,
        "new_connections": {
            "total": attempts.len(),
            "failed": failed_new.len(),
            "failures_by_kind": kinds(failed_new.iter().copied()),
            "failure_examples": examples(failed_new.iter().copied()),
        },
        "long_lived": {
            "clients": clients,
            "requests": requests.len(),
            "failed": failed_long.len(),
            "failures_by_kind": kinds(failed_long.iter().copied()),
            "failure_examples": examples(failed_long.iter().copied()),
            "connections_closed_by_the_lb": reconnects,
        },
        "haproxy_processes_after_changes": after_changes,
        "haproxy_pss_kib_after_changes": pss_kib,
        "haproxy_processes_after_clients_left": after_clients,
    });
    let row = vec![
        kind.name().to_owned(),
        format!("{}", sizes.changes as usize - errors.len()),
        reload_text,
        cell(&failed_new, attempts.len()),
        cell(&failed_long, requests.len()),
        format!("{reconnects} of {clients}"),
        format!("{after_changes} ({})", crate::footprint::mib(pss_kib)),
        after_clients.to_string(),
    ];
    Ok((json, row))
}

/// Both load balancers.
pub async fn bench(sizes: Sizes) -> Value {
    println!(
        "## reload disruption: {} config changes under load\n\n\
         Each change sets another connect timeout, so haproxy.cfg changes and HAProxy reloads: apilb through \
         `apilb reload` (what `systemctl reload apilb` runs), the baseline as Debian's haproxy.service does \
         (`haproxy -c`, then `kill -USR2`). Load: {} new connections/s; {} long-lived connections, plus {} \
         more after each change, each sending a request every {:?}.\n",
        sizes.changes, sizes.rate, sizes.long_lived, sizes.long_lived_per_change, sizes.period
    );
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for kind in LbKind::BOTH {
        match run(kind, sizes).await {
            Ok((json, row)) => {
                results.push(json);
                rows.push(row);
            }
            Err(e) => {
                println!("{}: failed to run: {e}", kind.name());
                results.push(json!({"lb": kind.name(), "error": e}));
            }
        }
    }
    println!(
        "{}",
        table(
            &[
                "lb",
                "changes applied",
                "change applied in (p50 / p99)",
                "new connections failed",
                "long-lived requests failed",
                "long-lived connections closed",
                "HAProxy processes (memory) after the changes",
                "after the clients left",
            ],
            &rows
        )
    );
    json!({
        "settings": {
            "changes": sizes.changes,
            "new_connections_per_s": sizes.rate,
            "long_lived": sizes.long_lived,
            "long_lived_per_change": sizes.long_lived_per_change,
            "long_lived_period_ms": ms(sizes.period),
        },
        "runs": results,
    })
}
