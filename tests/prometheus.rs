//! The monitoring assets against a real Prometheus: the shipped alert rules
//! (contrib/prometheus/alerts.yaml) and the dashboard's queries
//! (contrib/grafana/apilb.json), evaluated by the `prometheus` binary
//! (`APILB_PROMETHEUS`; scripts/test-monitoring takes it from Debian's
//! package) that scrapes, every second, two live agents (real HAProxy,
//! real TLS test API servers) and HAProxy's own exporter.
//!
//! - Static (`A`): three masters, HAProxy's `stats:` listener on, scraped
//!   as `job="haproxy"` too.
//! - Discovery (`B`): a lab cluster whose masters are discovered from its
//!   EndpointSlices.
//!
//! Both are `job="apilb"`, in different `config_group`s (their settings
//! differ by design). Prometheus listens on 127.0.0.1 only, keeps its data
//! in a temporary directory and is killed at the end, failure or not.
//!
//! What it proves:
//! 1. while both nodes are healthy, no alert is pending or firing at any
//!    evaluation (`ALERTS` over the whole healthy window, and the alerts API);
//! 2. each alert of the rules fires in its scenario and clears once the
//!    problem is gone: every master down (`ApilbNoHealthyMaster`; the
//!    node's failed connections, through the fail-open path, reach the
//!    dashboard's connection-errors panel), one master down (`ApilbMastersDegraded`), a
//!    master whose /readyz flips (`ApilbMasterFlapping`), a lasting invalid
//!    apilb.yaml (`ApilbReloadsFailing`: still firing evaluations later,
//!    quiet once fixed), auth mode `auto` before the node's certificate
//!    exists (`ApilbCheckNotAuthenticated`, cleared when it appears),
//!    HAProxy SIGKILLed and respawned (`ApilbHAProxyRestarting`), HAProxy
//!    frozen with SIGSTOP (`ApilbHAProxyDown`), the agent gone
//!    (`ApilbAgentDown`, cleared by a new agent adopting HAProxy), the
//!    discovery list stalled (`ApilbDiscoveryStale`), the two nodes put in
//!    one config group (`ApilbConfigDrift`) and the scrape job renamed
//!    (`ApilbAgentAbsent`); the last two change Prometheus's scrape config
//!    (reloaded), which is what those alerts are about. The test fails if
//!    alerts.yaml gains an alert no scenario covers;
//! 3. every query of the dashboard (panels and variables, Grafana's
//!    variables substituted: `$__rate_interval` is 1m, the others `.*`)
//!    runs without error or warning and returns data, instant and as a
//!    range, on the healthy nodes and again after the scenarios. Healthy
//!    nodes already give every panel data: the agent creates its counters
//!    at 0 (per master, per reload result), node B provides the discovery
//!    series (`time() - (apilb_discovery_last_success_timestamp_seconds >
//!    0)` has none without discovery), and the HAProxy panels read the
//!    `stats:` exporter of node A;
//! 4. Prometheus logs no rule evaluation or template expansion failure.
//!
//! The test's copy of the rules is rewritten only so that it fits in a
//! few minutes (the expressions' logic is otherwise the shipped one):
//! every `for:` becomes `0s` (so there is no pending state: an alert fires
//! at the first evaluation that sees its problem, and the healthy check
//! catches even a single bad evaluation), the `[15m]` windows of
//! `ApilbMasterFlapping` and `ApilbHAProxyRestarting` become `[20s]`, and
//! `ApilbDiscoveryStale`'s 900 s threshold becomes 10 s (the watch reports
//! itself alive at least every 5 s, from the lab cluster's bookmarks).
//!
//! Ignored by plain `cargo test` (it needs the binary); run by
//! scripts/test-monitoring with `--include-ignored`. Without
//! `APILB_PROMETHEUS` it fails rather than skips.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apilb::agent::Control;
use apilb_testkit::lab::{ClusterKind, LabOptions};
use nix::sys::signal::Signal;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Generous: the machine may be a busy two-core box. These bound a wait
/// for an event, they are not what the test measures.
const LIMIT: Duration = Duration::from_secs(60);

/// The alerts each scenario below proves; must be every alert of the rules.
const PROVEN: &[&str] = &[
    "ApilbNoHealthyMaster",
    "ApilbMastersDegraded",
    "ApilbMasterFlapping",
    "ApilbReloadsFailing",
    "ApilbHAProxyRestarting",
    "ApilbHAProxyDown",
    "ApilbCheckNotAuthenticated",
    "ApilbDiscoveryStale",
    "ApilbConfigDrift",
    "ApilbAgentDown",
    "ApilbAgentAbsent",
];

// ---------------------------------------------------------------------------
// The rules, rewritten for seconds.

/// The test's copy of alerts.yaml (see the module doc for the rewrites),
/// and the names of its alerts.
fn rules_for_test() -> (String, Vec<String>) {
    let text = std::fs::read_to_string(repo("contrib/prometheus/alerts.yaml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let rewrites: &[(&str, &str, &str)] = &[
        ("ApilbMasterFlapping", "[15m]", "[20s]"),
        ("ApilbHAProxyRestarting", "[15m]", "[20s]"),
        ("ApilbDiscoveryStale", "> 900", "> 10"),
    ];
    let mut names = Vec::new();
    for group in doc["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_owned();
            let mut expr = rule["expr"].as_str().unwrap().to_owned();
            for (alert, from, to) in rewrites {
                if *alert == name {
                    assert!(expr.contains(from), "{name}'s expression no longer has {from}: {expr}");
                    expr = expr.replace(from, to);
                }
            }
            rule["expr"] = expr.into();
            assert!(rule.get("for").is_some(), "{name} has no for:");
            rule["for"] = "0s".into();
            names.push(name);
        }
    }
    (serde_yaml::to_string(&doc).unwrap(), names)
}

// ---------------------------------------------------------------------------
// Prometheus.

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP/1.0 request (no chunked answers); status and body.
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to prometheus");
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let buf = String::from_utf8_lossy(&buf).into_owned();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// A Prometheus server on 127.0.0.1, killed when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    /// When it started, for the progress lines.
    since: std::time::Instant,
}

/// One active alert, as /api/v1/alerts lists it.
#[derive(Debug, Clone)]
struct Alert {
    name: String,
    state: String,
    labels: serde_json::Map<String, Value>,
    annotations: serde_json::Map<String, Value>,
}

impl Alert {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

impl Prometheus {
    async fn start(binary: &Path, config: &str, rules: &str) -> Prometheus {
        let dir = tempfile::Builder::new().prefix("apilb-prometheus-").tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yaml"), rules).unwrap();
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = dir.path().join("prometheus.log");
        // Prometheus cannot report a port it picked itself: take a free
        // one, and try another if something took it in between.
        for _ in 0..5 {
            let port = apilb_testkit::lab::free_port(None).unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut cmd = std::process::Command::new(binary);
            cmd.arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--web.enable-lifecycle")
                .arg("--storage.tsdb.retention.time=1d")
                .current_dir(dir.path())
                .stdin(std::process::Stdio::null())
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::options().append(true).open(&log).unwrap());
            // SAFETY: prctl is async-signal-safe and allocates nothing.
            // Killed with the test process even if it dies without unwinding.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
            let start = tokio::time::Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    if text.contains("address already in use") {
                        break;
                    }
                    panic!("prometheus exited with {status}:\n{text}");
                }
                if tokio::net::TcpStream::connect(addr).await.is_ok()
                    && request(addr, "GET", "/-/ready").await.0 == 200
                {
                    return Prometheus { child, addr, dir, since: std::time::Instant::now() };
                }
                if start.elapsed() > LIMIT {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("prometheus not ready:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("no free port for prometheus after 5 attempts");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn request(&self, method: &str, path: &str) -> (u16, String) {
        request(self.addr, method, path).await
    }

    async fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path).await
    }

    /// The `data` of an API answer, or its error.
    async fn api(&self, path: &str) -> Result<Value, String> {
        let (code, body) = self.get(path).await;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("HTTP {code}: {e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {code}: {} {}", v["errorType"], v["error"]));
        }
        if let Some(w) = v.get("warnings").filter(|w| w.as_array().is_some_and(|a| !a.is_empty())) {
            return Err(format!("warnings: {w}"));
        }
        Ok(v["data"].clone())
    }

    /// An instant query: its series.
    async fn query(&self, q: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(q))).await?;
        match data["resultType"].as_str() {
            Some("vector" | "matrix") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            Some("scalar") => Ok(vec![data["result"].clone()]),
            other => Err(format!("result type {other:?}")),
        }
    }

    /// A range query over the last `seconds`, every `step` seconds.
    async fn query_range(&self, q: &str, seconds: u64, step: u64) -> Result<Vec<Value>, String> {
        let end = self.now().await;
        let data = self
            .api(&format!(
                "/api/v1/query_range?query={}&start={}&end={end}&step={step}",
                encode(q),
                end - seconds as f64
            ))
            .await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// Prometheus's clock.
    async fn now(&self) -> f64 {
        let r = self.query("time()").await.expect("time()");
        r[0][0].as_f64().expect("time() is a number")
    }

    /// The value of a one-series query, if it has one.
    async fn value(&self, q: &str) -> Option<f64> {
        let r = self.query(q).await.ok()?;
        r.first()?["value"][1].as_str()?.parse().ok()
    }

    /// The pending and firing alerts.
    async fn alerts(&self) -> Vec<Alert> {
        let data = self.api("/api/v1/alerts").await.expect("/api/v1/alerts");
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let labels = a["labels"].as_object().cloned().unwrap_or_default();
                Alert {
                    name: labels.get("alertname").and_then(Value::as_str).unwrap_or("").to_owned(),
                    state: a["state"].as_str().unwrap_or("").to_owned(),
                    labels,
                    annotations: a["annotations"].as_object().cloned().unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The time of the rule group's last evaluation.
    async fn last_evaluation(&self) -> Option<String> {
        let data = self.api("/api/v1/rules").await.ok()?;
        data["groups"][0]["lastEvaluation"].as_str().map(str::to_owned)
    }

    /// Waits until the rules were evaluated `n` more times.
    async fn evaluations(&self, n: usize) {
        let mut last = self.last_evaluation().await;
        for _ in 0..n {
            let start = tokio::time::Instant::now();
            loop {
                let now = self.last_evaluation().await;
                if now.is_some() && now != last {
                    last = now;
                    break;
                }
                assert!(start.elapsed() < LIMIT, "the rules are not evaluated");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Writes a new scrape config and has Prometheus load it.
    async fn reload(&self, config: &str) {
        std::fs::write(self.dir.path().join("prometheus.yml"), config).unwrap();
        let (code, body) = self.request("POST", "/-/reload").await;
        assert_eq!(code, 200, "reload: {body}\n{}", self.log());
    }

    /// Polls until `pred` holds on the active alerts; panics with them after
    /// [`LIMIT`].
    async fn wait_alerts(&self, what: &str, pred: impl Fn(&[Alert]) -> bool) {
        let start = tokio::time::Instant::now();
        loop {
            let alerts = self.alerts().await;
            if pred(&alerts) {
                return;
            }
            if start.elapsed() > LIMIT {
                let list: Vec<String> = alerts
                    .iter()
                    .map(|a| format!("{} {} {}", a.name, a.state, Value::Object(a.labels.clone())))
                    .collect();
                panic!(
                    "timed out after {LIMIT:?} waiting for: {what}\nactive alerts:\n  {}",
                    list.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until `name` fires with every label of `labels`.
    async fn firing(&self, name: &str, labels: &[(&str, &str)]) -> Alert {
        let matches =
            |a: &Alert| a.name == name && a.state == "firing" && labels.iter().all(|(k, v)| a.label(k) == *v);
        self.wait_alerts(&format!("{name} {labels:?} firing"), |all| all.iter().any(matches)).await;
        let alert = self.alerts().await.into_iter().find(matches).expect("the alert fires");
        eprintln!(
            "prometheus +{:.0?}: {name} fires: {}",
            self.since.elapsed(),
            Value::Object(alert.labels.clone())
        );
        // Its templates expand (Prometheus puts its error in the text).
        for key in ["summary", "description", "runbook"] {
            let text = alert.annotations.get(key).and_then(Value::as_str).unwrap_or("");
            assert!(!text.is_empty() && !text.contains("<error"), "{name}: annotation {key}: {text:?}");
        }
        alert
    }

    /// Waits until `name` is neither pending nor firing.
    async fn cleared(&self, name: &str) {
        self.wait_alerts(&format!("{name} cleared"), |all| all.iter().all(|a| a.name != name)).await;
        eprintln!("prometheus +{:.0?}: {name} cleared", self.since.elapsed());
    }

    /// Waits until no alert at all is active.
    async fn quiet(&self, after: &str) {
        self.wait_alerts(&format!("no alert active after {after}"), |all| all.is_empty()).await;
        eprintln!("prometheus +{:.0?}: no alert active after {after}", self.since.elapsed());
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scrape config: both agents as job `job`, each in its own config
/// group unless `one_group`, and HAProxy's exporter. Another `job` leaves
/// job `apilb` without targets (rather than removing it: Prometheus marks
/// the series of targets gone from a job stale at once, but not those of a
/// job gone from its config, which linger for the lookback delta, 5 min).
fn scrape_config(job: &str, a: SocketAddr, b: SocketAddr, haproxy: SocketAddr, one_group: bool) -> String {
    let (ga, gb) = if one_group { ("lab", "lab") } else { ("static", "discovery") };
    let empty = if job == "apilb" { "" } else { "  - job_name: apilb\n    static_configs: []\n" };
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files: [rules.yaml]\n\
         scrape_configs:\n{empty}\
         \x20 - job_name: {job}\n\
         \x20   static_configs:\n\
         \x20     - targets: [\"{a}\"]\n\
         \x20       labels: {{config_group: {ga}}}\n\
         \x20     - targets: [\"{b}\"]\n\
         \x20       labels: {{config_group: {gb}}}\n\
         \x20 - job_name: haproxy\n\
         \x20   static_configs:\n\
         \x20     - targets: [\"{haproxy}\"]\n"
    )
}

// ---------------------------------------------------------------------------
// The dashboard.

/// Every query of the dashboard with Grafana's variables substituted:
/// (where, PromQL). A variable's `label_values(<series>, <label>)`
/// becomes `count by (<label>) (<series>)`.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("contrib/grafana/apilb.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let variables: Vec<String> = doc["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    let substitute = |e: &str| {
        let mut e =
            e.replace("$__rate_interval", "1m").replace("$__interval", "1s").replace("$__range", "5m");
        for v in &variables {
            e = e.replace(&format!("${{{v}}}"), ".*").replace(&format!("${v}"), ".*");
        }
        assert!(!e.contains('$'), "unknown variable in {e}");
        e
    };
    let mut out = Vec::new();
    for v in doc["templating"]["list"].as_array().unwrap() {
        if let Some(def) = v["definition"].as_str() {
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: {def}", v["name"]));
            let (series, label) = inner.rsplit_once(',').unwrap();
            out.push((
                format!("variable {}", v["name"]),
                substitute(&format!("count by ({}) ({series})", label.trim())),
            ));
        }
    }
    fn panels(list: &Value, subst: &dyn Fn(&str) -> String, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            panels(&p["panels"], subst, out);
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((
                        format!("panel {:?} {}", p["title"].as_str().unwrap_or(""), t["refId"]),
                        subst(e),
                    ));
                }
            }
        }
    }
    panels(&doc["panels"], &substitute, &mut out);
    assert!(out.len() >= 30, "only {} dashboard queries found", out.len());
    out
}

/// Runs every dashboard query, instant and over the last 30 s: each must
/// succeed and return data.
async fn dashboard_check(prom: &Prometheus, when: &str) {
    let mut errors = Vec::new();
    let queries = dashboard_queries();
    for (place, q) in &queries {
        let instant = prom.query(q).await;
        let range = prom.query_range(q, 30, 5).await;
        match (instant, range) {
            (Ok(i), Ok(r)) if !i.is_empty() && !r.is_empty() => {}
            (Ok(i), Ok(r)) => {
                errors.push(format!("{place}: no data ({} / {} series): {q}", i.len(), r.len()))
            }
            (Err(e), _) | (_, Err(e)) => errors.push(format!("{place}: {e}: {q}")),
        }
    }
    assert!(errors.is_empty(), "dashboard queries {when}:\n  {}", errors.join("\n  "));
    eprintln!(
        "prometheus +{:.0?}: {} dashboard queries have data {when}",
        prom.since.elapsed(),
        queries.len()
    );
}

// ---------------------------------------------------------------------------
// The scenarios.

fn signal(pid: u32, sig: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

/// Sends SIGCONT when dropped, so a failing test leaves nothing stopped.
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a prometheus binary in APILB_PROMETHEUS; scripts/test-monitoring runs it"]
async fn alerts_and_dashboard_on_a_real_prometheus() {
    let binary =
        PathBuf::from(std::env::var_os("APILB_PROMETHEUS").expect(
            "APILB_PROMETHEUS must name a prometheus binary (scripts/test-monitoring fetches Debian's)",
        ));
    let started = std::time::Instant::now();
    let (rules, names) = rules_for_test();
    let uncovered: Vec<&String> = names.iter().filter(|n| !PROVEN.contains(&n.as_str())).collect();
    assert!(uncovered.is_empty(), "alerts without a scenario here: {uncovered:?}");
    for p in PROVEN {
        assert!(names.iter().any(|n| n == p), "{p} is not in alerts.yaml any more");
    }

    // A: three static masters and HAProxy's exporter.
    let mut a = Env::new(LabOptions::default()).await;
    let stats = SocketAddr::from(([127, 0, 0, 1], apilb_testkit::lab::free_port(None).unwrap()));
    let a_yaml = a.lab.config_yaml(&format!("stats:\n  listen: \"{stats}\"\n"));
    a.lab.write_config(&a_yaml).unwrap();
    a.start_agent().await;
    // B: masters discovered from a lab cluster's EndpointSlices.
    let mut b =
        Env::new(LabOptions { cluster: Some(ClusterKind::EndpointSlices), ..LabOptions::default() }).await;
    let b_yaml = b.lab.config_yaml(&b.lab.discovery_yaml(""));
    b.lab.write_config(&b_yaml).unwrap();
    b.start_agent().await;
    let a_settings = a.wait_all_up().await.config.settings_hash;
    b.wait_status(LIMIT, "B's masters discovered and UP", |s| {
        s.discovery.as_ref().is_some_and(|d| d.last_success.is_some())
            && s.in_rotation().count() == 3
            && s.in_rotation()
                .all(|m| m.source == "discovered" && m.state == "UP" && m.check_status == "L7OK")
    })
    .await;
    let (ia, ib) = (a.lab.metrics.to_string(), b.lab.metrics.to_string());
    let (ia, ib) = (ia.as_str(), ib.as_str());

    let config = scrape_config("apilb", a.lab.metrics, b.lab.metrics, stats, false);
    let prom = Prometheus::start(&binary, &config, &rules).await;
    eprintln!("prometheus on {} ({:?} after the start)", prom.addr, started.elapsed());

    // 1. Healthy: every target up and both nodes healthy, then no alert at
    // any evaluation for a while.
    let start = tokio::time::Instant::now();
    loop {
        let up = prom.value("count(up == 1)").await;
        let healthy = prom.value("count(apilb_masters_healthy == apilb_masters_configured)").await;
        if up == Some(3.0) && healthy == Some(2.0) {
            break;
        }
        assert!(start.elapsed() < LIMIT, "targets up: {up:?}, healthy nodes: {healthy:?}\n{}", prom.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Evaluations until now may have run before the first scrape of a
    // target (ApilbAgentAbsent, with `for: 0s`): the window starts after
    // the next one.
    prom.evaluations(2).await;
    let healthy_from = prom.now().await;
    prom.evaluations(10).await;
    let window = (prom.now().await - healthy_from).floor() as u64;
    let seen =
        prom.query(&format!("count by (alertname, alertstate) (count_over_time(ALERTS[{window}s]))")).await;
    assert_eq!(seen, Ok(vec![]), "alerts during {window}s of a healthy state");
    assert!(prom.alerts().await.is_empty(), "{:?}", prom.alerts().await);
    eprintln!("prometheus +{:.0?}: healthy for {window}s, no alert", prom.since.elapsed());
    dashboard_check(&prom, "on healthy nodes").await;

    // 2a. Every master of A down: the node still reaches them through the
    // fail-open path (connections counted as errors there).
    for s in &a.lab.servers {
        s.crash();
    }
    prom.firing("ApilbNoHealthyMaster", &[("instance", ia), ("job", "apilb"), ("severity", "critical")])
        .await;
    for _ in 0..3 {
        assert!(served_by(&a).await.is_err(), "every master is down");
    }
    // The dashboard's panel shows them (errors on the fail-open twins are
    // the masters' errors too).
    let errors =
        format!("sum by (master) (rate(apilb_master_connection_errors_total{{instance=\"{ia}\"}}[1m])) > 0");
    let start = tokio::time::Instant::now();
    while prom.query(&errors).await.map_or(true, |r| r.is_empty()) {
        assert!(start.elapsed() < LIMIT, "no connection errors in Prometheus: {errors}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for s in &a.lab.servers {
        s.restart().await.unwrap();
    }
    prom.cleared("ApilbNoHealthyMaster").await;
    prom.quiet("every master back").await;

    // 2b. One master down.
    a.lab.servers[0].crash();
    prom.firing("ApilbMastersDegraded", &[("instance", ia)]).await;
    a.lab.servers[0].restart().await.unwrap();
    prom.cleared("ApilbMastersDegraded").await;
    prom.quiet("the master back").await;

    // 2c. A flapping master on A while B's discovery stalls.
    let flapping = async {
        let m = &a.lab.servers[1];
        let name = m.name().to_owned();
        let state = |want: &'static str| {
            let name = name.clone();
            move |s: &apilb::status::Status| s.masters.iter().any(|x| x.name == name && x.state == want)
        };
        let mut flips = 0;
        while !prom.alerts().await.iter().any(|x| x.name == "ApilbMasterFlapping" && x.state == "firing") {
            assert!(flips < 30, "ApilbMasterFlapping did not fire after {flips} flips");
            m.set_readyz(500);
            a.wait_status(LIMIT, "the master DOWN", state("DOWN")).await;
            m.set_readyz(200);
            a.wait_status(LIMIT, "the master UP", state("UP")).await;
            flips += 1;
        }
        prom.firing("ApilbMasterFlapping", &[("instance", ia), ("master", &name)]).await;
        prom.cleared("ApilbMasterFlapping").await;
    };
    let stale = async {
        let cluster = b.lab.cluster.clone().unwrap();
        cluster.stall_lists(true);
        cluster.expire();
        prom.firing("ApilbDiscoveryStale", &[("instance", ib)]).await;
        cluster.stall_lists(false);
        prom.cleared("ApilbDiscoveryStale").await;
    };
    tokio::join!(flapping, stale);
    prom.quiet("flapping and stale discovery").await;

    // 2d. A lasting invalid apilb.yaml: firing as long as it lasts.
    a.lab.write_config(&format!("{a_yaml}bogus: true\n")).unwrap();
    prom.firing("ApilbReloadsFailing", &[("instance", ia)]).await;
    prom.evaluations(5).await;
    let lasting = prom
        .value(&format!(
            "count_over_time(ALERTS{{alertname=\"ApilbReloadsFailing\", alertstate=\"firing\", instance=\"{ia}\"}}[4s])"
        ))
        .await;
    assert!(lasting >= Some(4.0), "ApilbReloadsFailing in the last 4 evaluations: {lasting:?}");
    prom.firing("ApilbReloadsFailing", &[("instance", ia)]).await;
    a.lab.write_config(&a_yaml).unwrap();
    prom.cleared("ApilbReloadsFailing").await;
    prom.quiet("the config fixed").await;

    // 2e. auth: auto before the node's certificate exists (bootstrap), then
    // the certificate appears (the node joined).
    let d = a.lab.dir.path().display().to_string();
    let client_cert = format!("{{mode: client_cert, cert_file: {d}/node.crt, key_file: {d}/node.key}}");
    assert!(a_yaml.contains(&client_cert), "{a_yaml}");
    let auto = format!("{{mode: auto, cert_file: {d}/joined.crt, key_file: {d}/joined.key, well_known: []}}");
    a.lab.write_config(&a_yaml.replace(&client_cert, &auto)).unwrap();
    prom.firing("ApilbCheckNotAuthenticated", &[("instance", ia)]).await;
    std::fs::copy(a.lab.path("node.key"), a.lab.path("joined.key")).unwrap();
    std::fs::copy(a.lab.path("node.crt"), a.lab.path("joined.crt")).unwrap();
    prom.cleared("ApilbCheckNotAuthenticated").await;
    a.lab.write_config(&a_yaml).unwrap();
    a.wait_status(LIMIT, "the original config in effect again", |s| {
        s.config.settings_hash == a_settings && s.config.pending_error.is_none()
    })
    .await;
    prom.quiet("the node joined").await;

    // 2f. HAProxy SIGKILLed (respawned by the agent), then frozen.
    let pid = a.haproxy_pid().unwrap();
    signal(pid, Signal::SIGKILL);
    prom.firing("ApilbHAProxyRestarting", &[("instance", ia)]).await;
    a.wait_status(LIMIT, "HAProxy running again", move |s| {
        s.haproxy.running && s.haproxy.master_pid.is_some_and(|p| p != pid)
    })
    .await;
    let pid = a.haproxy_pid().unwrap();
    let resume = Continue(pid);
    signal(pid, Signal::SIGSTOP);
    prom.firing("ApilbHAProxyDown", &[("instance", ia), ("severity", "critical")]).await;
    drop(resume);
    prom.cleared("ApilbHAProxyDown").await;
    prom.cleared("ApilbHAProxyRestarting").await;
    prom.quiet("HAProxy back").await;

    // 2g. The agent gone (HAProxy left running), then a new one adopting it.
    let handle = a.agent.take().unwrap();
    handle.send(Control::Handover).await;
    handle.wait().await;
    prom.firing("ApilbAgentDown", &[("instance", ia), ("job", "apilb")]).await;
    a.start_agent().await;
    prom.cleared("ApilbAgentDown").await;
    prom.quiet("a new agent").await;

    // 2h. The two nodes (different settings) in one config group.
    prom.reload(&scrape_config("apilb", a.lab.metrics, b.lab.metrics, stats, true)).await;
    prom.firing("ApilbConfigDrift", &[("job", "apilb"), ("config_group", "lab")]).await;
    prom.reload(&config).await;
    prom.cleared("ApilbConfigDrift").await;

    // 2i. No target has job="apilb" any more (the job renamed in the
    // scrape config).
    prom.reload(&scrape_config("apilb-renamed", a.lab.metrics, b.lab.metrics, stats, false)).await;
    prom.firing("ApilbAgentAbsent", &[("job", "apilb")]).await;
    prom.reload(&config).await;
    prom.cleared("ApilbAgentAbsent").await;
    prom.quiet("the scrape config restored").await;

    // 3. After the scenarios, every dashboard query has data.
    dashboard_check(&prom, "after the scenarios").await;
    // Prometheus evaluated every rule and expanded every template without
    // complaint (both are logged as warnings).
    let log = prom.log();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("level=error")
                || l.contains("Evaluating rule failed")
                || l.contains("Expanding alert template failed")
        })
        .collect();
    assert!(complaints.is_empty(), "prometheus complained:\n  {}", complaints.join("\n  "));
    eprintln!("prometheus test done in {:?}", started.elapsed());
}
