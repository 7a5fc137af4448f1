//! The monitoring assets in contrib/ against the real agent: every `apilb_*`
//! metric that an alert (contrib/prometheus/alerts.yaml) or a dashboard
//! query (contrib/grafana/apilb.json) uses must appear in the /metrics of a
//! running agent (lab API servers, real HAProxy).
//!
//! Names that another part of the project will add later are listed in
//! [`PLANNED`]; they are tolerated only while no source file under src/
//! mentions them. As soon as src/ defines one, it must be exported too.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use apilb_testkit::lab::LabOptions;
use support::*;

/// Metrics the discovery work will add (names agreed in advance).
const PLANNED: &[&str] = &[
    "apilb_masters",
    "apilb_discovery_last_success_timestamp_seconds",
    "apilb_discovery_watch_restarts_total",
    "apilb_master_changes_total",
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Every `apilb_<name>` token in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("apilb_") {
        let start = i + pos;
        let mut end = start + "apilb_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            out.push(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// PromQL of the alert rules: `groups[].rules[].expr`.
fn alert_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("contrib/prometheus/alerts.yaml")).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("alerts.yaml is YAML");
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().unwrap_or("?").to_owned();
            let expr = rule["expr"].as_str().expect("expr").to_owned();
            out.push((format!("alert {name}"), expr));
        }
    }
    out
}

/// PromQL of the dashboard: every `expr`, and the variables' queries.
fn dashboard_exprs() -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                let here = map
                    .get("title")
                    .or_else(|| map.get("name"))
                    .and_then(|t| t.as_str())
                    .map(|t| format!("{at}/{t}"))
                    .unwrap_or_else(|| at.to_owned());
                for (k, child) in map {
                    match (k.as_str(), child) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            out.push((format!("dashboard {here}"), s.clone()))
                        }
                        _ => walk(child, &here, out),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    walk(item, at, out);
                }
            }
            _ => {}
        }
    }
    let text = std::fs::read_to_string(repo("contrib/grafana/apilb.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).expect("apilb.json is JSON");
    let mut out = Vec::new();
    walk(&doc, "", &mut out);
    out
}

/// Concatenated text of every file under src/.
fn source_text(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            source_text(&path, out);
        } else if let Ok(text) = std::fs::read_to_string(&path) {
            out.push_str(&text);
        }
    }
}

/// Sample names in a Prometheus text exposition.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `apilb_*` name used in contrib/, with where it is used.
fn used_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (place, expr) in alert_exprs().into_iter().chain(dashboard_exprs()) {
        for name in metric_names(&expr) {
            used.entry(name).or_default().insert(place.clone());
        }
    }
    used
}

#[test]
fn contrib_queries_reference_metrics() {
    let used = used_metrics();
    // A parsing slip must not turn the real test into a no-op.
    assert!(used.len() >= 20, "only {} apilb_* names found", used.len());
    for must in [
        "apilb_masters_healthy",
        "apilb_master_transitions_total",
        "apilb_haproxy_reloads_total",
        "apilb_config_info",
    ] {
        assert!(used.contains_key(must), "{must} is not used in contrib/");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_contrib_is_exported() {
    let used = used_metrics();
    let mut env = Env::new(LabOptions::default()).await;
    // Slow checks, so connection errors (which exist only once a connection
    // to a master failed) are counted before a check takes the master out.
    env.lab.health.interval = "2s".into();
    env.lab.health.fall = 3;
    env.lab.write_config(&env.lab.config_yaml("")).unwrap();
    env.start_agent().await;
    env.wait_all_up().await;

    // Series that exist only after something happened: the masters die
    // while HAProxy still counts them UP, so the node's connections fail
    // (HAProxy counts a connection error once its retries on the other
    // masters failed too), and then they go DOWN (transitions).
    for server in &env.lab.servers {
        server.crash();
    }
    let metrics_addr = env.agent().metrics_addr();
    eventually(Duration::from_secs(20), "connection errors counted", || async {
        for _ in 0..4 {
            let _ = served_by(&env).await;
        }
        http_get(metrics_addr, "/metrics").await.1.contains("apilb_master_connection_errors_total{")
    })
    .await;
    env.wait_status(Duration::from_secs(20), "every master DOWN", |s| {
        s.masters.iter().all(|m| m.state == "DOWN")
    })
    .await;

    // Every master down: HAProxy keeps running (fail open).
    assert!(alive(env.haproxy_pid().expect("pidfile")));

    let (code, body) = http_get(metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    let have = exported(&body);
    let mut src = String::new();
    source_text(&repo("src"), &mut src);

    let mut missing = Vec::new();
    for (name, places) in &used {
        if have.contains(name) {
            continue;
        }
        let planned = PLANNED.contains(&name.as_str());
        let in_src = src.contains(&format!("\"{name}\""));
        if planned && !in_src {
            eprintln!("planned metric {name} (not in src/ yet) used by {places:?}");
            continue;
        }
        missing.push(format!("{name} (used by {places:?})"));
    }
    assert!(
        missing.is_empty(),
        "metrics used in contrib/ but not exported by a running agent:\n  {}\n\n/metrics:\n{body}",
        missing.join("\n  ")
    );
}

/// The sample value of the series `series` (exact text before the value)
/// in an exposition, summed over every series that starts with it.
fn sum_of(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// Every master down: HAProxy sends connections to the fail-open twins,
/// and counts their failures there. They are the master's failures all the
/// same, and the dashboard's panel must not go blank in a total outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_in_fail_open_are_counted() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    for server in &env.lab.servers {
        server.crash();
    }
    env.wait_status(Duration::from_secs(20), "every master DOWN", |s| {
        s.masters.iter().all(|m| m.state == "DOWN")
    })
    .await;
    let addr = env.agent().metrics_addr();
    // Counts from before the checks took the masters out are not what
    // this is about: wait until a poll saw the twins, then start from there.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = http_get(addr, "/metrics").await.1;
    let (errors, redispatches) = (
        sum_of(&before, "apilb_master_connection_errors_total{"),
        sum_of(&before, "apilb_master_redispatches_total{"),
    );
    for _ in 0..5 {
        assert!(served_by(&env).await.is_err(), "every master is down");
    }
    let mut last = String::new();
    let counted = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            last = http_get(addr, "/metrics").await.1;
            if sum_of(&last, "apilb_master_connection_errors_total{") >= errors + 5.0
                && sum_of(&last, "apilb_master_redispatches_total{") > redispatches
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        counted.is_ok(),
        "5 failed connections in fail-open: errors {errors} → {}, redispatches {redispatches} → {}\n\
         HAProxy: {:?}",
        sum_of(&last, "apilb_master_connection_errors_total{"),
        sum_of(&last, "apilb_master_redispatches_total{"),
        haproxy_servers(&env)
            .await
            .iter()
            .map(|s| format!(
                "{} econ={} wretr={} wredis={}",
                s.name, s.connect_errors, s.retries, s.redispatches
            ))
            .collect::<Vec<_>>()
    );
}

/// Sends SIGCONT to a process when dropped, so a failing test does not
/// leave it stopped.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0 as i32),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// A frozen HAProxy master (SIGSTOP) answers nothing: the agent's poll
/// must say so at the next check interval, not after the 5 s limit of
/// other commands, and without holding the agent up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_haproxy_is_seen_down_at_the_next_poll() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    let pid = env.haproxy_pid().unwrap();
    let _resume = Continue(pid);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let frozen = tokio::time::Instant::now();
    env.wait_status(Duration::from_secs(15), "HAProxy seen down", |s| !s.haproxy.running).await;
    let took = frozen.elapsed();
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("\napilb_haproxy_up 0\n"), "{metrics}");
    // One check interval (1 s) plus the poll's limit (0.5 s); before, the
    // poll waited 5 s.
    assert!(took < Duration::from_secs(3), "HAProxy seen down {took:?} after it froze");
    // The next polls do not take seconds either: the status keeps coming.
    let mut status = env.agent().status();
    status.borrow_and_update();
    let started = tokio::time::Instant::now();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(3), status.changed())
            .await
            .expect("a status update within 3 s while HAProxy is frozen")
            .unwrap();
    }
    let three = started.elapsed();
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    env.wait_status(Duration::from_secs(10), "HAProxy up again", |s| s.haproxy.running).await;
    eprintln!("a frozen HAProxy was seen down after {took:?}; 3 status updates took {three:?} meanwhile");
}

/// A refused configuration stays visible in the metrics for as long as it
/// lasts (the reload counter moves once per distinct error), and the
/// gauge goes back to 0 as soon as the file is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lasting_refusal_stays_visible_until_fixed() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    let addr = env.agent().metrics_addr();
    let good = std::fs::read_to_string(env.lab.config_path()).unwrap();
    let metrics = http_get(addr, "/metrics").await.1;
    for reason in ["invalid_config", "refused", "failed"] {
        assert!(metrics.contains(&format!("apilb_config_not_applied{{reason=\"{reason}\"}} 0")), "{metrics}");
    }
    env.lab.write_config(&good.replace("masters:\n", "masters:\n  - 10.0.0.9\n")).unwrap();
    let set = "apilb_config_not_applied{reason=\"invalid_config\"} 1";
    eventually(Duration::from_secs(10), "the refusal in the metrics", || async {
        http_get(addr, "/metrics").await.1.contains(set)
    })
    .await;
    // Still there seconds later, while the counter counted it once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let metrics = http_get(addr, "/metrics").await.1;
    assert!(metrics.contains(set), "{metrics}");
    assert!(metrics.contains("apilb_haproxy_reloads_total{result=\"invalid_config\"} 1"), "{metrics}");
    env.lab.write_config(&good).unwrap();
    eventually(Duration::from_secs(10), "the refusal cleared", || async {
        sum_of(&http_get(addr, "/metrics").await.1, "apilb_config_not_applied{") == 0.0
    })
    .await;
}

/// A change written while HAProxy's master is frozen is applied once it
/// answers again. Before, the reload tried against the frozen master timed
/// out and the change was refused for good: `apilb_config_not_applied`
/// (and ApilbReloadsFailing) stayed up until someone touched apilb.yaml
/// again (found by tests/prometheus.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_while_haproxy_is_frozen_is_applied_when_it_answers() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    let before = env.wait_all_up().await.config.hash;
    let pid = env.haproxy_pid().unwrap();
    let _resume = Continue(pid);
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    env.wait_status(Duration::from_secs(15), "HAProxy seen down", |s| !s.haproxy.running).await;
    env.lab.health.timeout = "2s".into();
    env.lab.write_config(&env.lab.config_yaml("")).unwrap();
    // Long enough for the agent to read the file twice (once a second),
    // which is when it applies a change, and for a reload tried against
    // the frozen master to give up (5 s).
    let mut status = env.agent().status();
    status.borrow_and_update();
    for _ in 0..8 {
        tokio::time::timeout(Duration::from_secs(10), status.changed())
            .await
            .expect("status updates while HAProxy is frozen")
            .unwrap();
    }
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    env.wait_status(Duration::from_secs(30), "the change applied", |s| {
        s.haproxy.running && s.config.hash != before && s.config.pending_error.is_none()
    })
    .await;
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert_eq!(sum_of(&metrics, "apilb_config_not_applied{"), 0.0, "{metrics}");
}
