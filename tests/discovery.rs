//! Discovery of the masters from the `default/kubernetes` endpoints, with
//! test API servers serving list and watch over TLS with client-certificate
//! auth, and clients opening connections continuously.
//!
//! Each change must show: 0 failed connections, no new HAProxy worker
//! (runtime API, no reload), established connections to unchanged masters
//! kept, and the change in HAProxy within 1 s of the watch event.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use apilb::haproxy::{cli, stat};
use apilb_testkit::lab::{ClusterKind, LabOptions, loopback};
use apilb_testkit::testapi::Load;
use support::*;

fn cluster_opts() -> LabOptions {
    LabOptions { cluster: Some(ClusterKind::EndpointSlices), ..LabOptions::default() }
}

async fn env_with_discovery(opts: LabOptions, extra: &str) -> Env {
    let mut env = Env::new(opts).await;
    let yaml = env.lab.config_yaml(&env.lab.discovery_yaml(extra));
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    env
}

async fn wait_discovered(env: &Env, n: usize) {
    env.wait_status(Duration::from_secs(15), "discovery applied", move |s| {
        s.discovery.as_ref().is_some_and(|d| d.last_success.is_some())
            && s.in_rotation().count() == n
            && s.in_rotation()
                .all(|m| m.source == "discovered" && m.state == "UP" && m.check_status == "L7OK")
    })
    .await;
}

/// The checked servers of the backend as HAProxy has them: (name, status).
async fn servers(env: &Env) -> Vec<(String, String)> {
    haproxy_servers(env).await.into_iter().filter(|s| !s.backup).map(|s| (s.name, s.status)).collect()
}

/// Waits until `pred` holds on HAProxy's checked servers; returns when.
async fn wait_servers(env: &Env, what: &str, pred: impl Fn(&[(String, String)]) -> bool) -> Instant {
    wait_haproxy(env, Duration::from_secs(20), what, |all| {
        let s: Vec<(String, String)> =
            all.iter().filter(|s| !s.backup).map(|s| (s.name.clone(), s.status.clone())).collect();
        pred(&s)
    })
    .await
    .into_std()
}

async fn worker(env: &Env) -> (Vec<u32>, usize) {
    let text =
        cli::command(&layout(&env.lab).master_socket(), "show proc", Duration::from_secs(2)).await.unwrap();
    let p = stat::parse_show_proc(&text).unwrap();
    (p.workers.iter().map(|w| w.pid).collect(), p.old_workers.len())
}

/// The lab config with discovery, and a short drain limit.
async fn env_short_drain(extra: &str) -> Env {
    let mut env = Env::new(cluster_opts()).await;
    let yaml = env
        .lab
        .config_yaml(&env.lab.discovery_yaml(extra))
        .replace("hard_stop_after: 1m", "hard_stop_after: 2s");
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    env
}

fn endpoints(ids: &[usize]) -> Vec<(IpAddr, bool)> {
    ids.iter().map(|i| (loopback(*i), true)).collect()
}

fn load(env: &Env) -> Load {
    Load::start(env.lab.listen, env.lab.client_tls().unwrap(), Some(env.lab.token.clone()), 3)
}

/// The apilb name of the master at 127.0.0.`i`: seeds keep their names.
fn apilb_name(i: usize) -> String {
    if i <= 3 { format!("master-{i}") } else { format!("127.0.0.{i}") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_master() {
    let mut env = env_with_discovery(cluster_opts(), "").await;
    wait_discovered(&env, 3).await;
    let before = worker(&env).await;
    let mut held = Vec::new();
    for i in 1..=3 {
        held.push((format!("master-{i}"), session_on(&env, &format!("master-{i}")).await));
    }
    let clients = load(&env);

    env.lab.add_server(4).await.unwrap();
    let cluster = env.lab.cluster.clone().unwrap();
    let event = cluster.set_endpoints(&endpoints(&[1, 2, 3, 4]));
    let present =
        wait_servers(&env, "127.0.0.4 in HAProxy", |s| s.iter().any(|(n, _)| n == "127.0.0.4")).await;
    let applied = present - event;
    wait_servers(&env, "127.0.0.4 UP", |s| s.iter().any(|(n, st)| n == "127.0.0.4" && st == "UP")).await;
    let in_rotation = Instant::now() - event;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let report = clients.stop().await;

    assert!(applied <= Duration::from_secs(1), "applied {applied:?} after the watch event");
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(
        report.by_server.contains_key("master-4"),
        "the new master takes connections: {:?}",
        report.by_server
    );
    assert_eq!(worker(&env).await, before, "no reload: same worker, no old worker");
    for (name, s) in &mut held {
        assert_eq!(&s.served_by().await.unwrap(), name, "the connection to {name} was kept");
    }
    let m = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(m.contains("apilb_master_changes_total{method=\"runtime\"} 1"), "{m}");
    assert!(m.contains("apilb_master_changes_total{method=\"reload\"} 0"), "{m}");
    assert!(m.contains("apilb_masters{source=\"discovered\"} 4"), "{m}");
    assert!(m.contains("apilb_discovery_last_success_timestamp_seconds"), "{m}");
    let cfg = std::fs::read_to_string(layout(&env.lab).config_file()).unwrap();
    assert!(
        cfg.contains(&format!("server 127.0.0.4 {} check", env.lab.servers[3].addr())),
        "the file follows"
    );
    let saved = std::fs::read_to_string(layout(&env.lab).masters_file()).unwrap();
    assert!(saved.contains("127.0.0.4"), "{saved}");
    env.agent = None;
    eprintln!(
        "add: in HAProxy {applied:?} after the event, in rotation after {in_rotation:?}; {} connections, 0 failed",
        report.ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_master() {
    let env = env_short_drain("").await;
    wait_discovered(&env, 3).await;
    let before = worker(&env).await;
    let mut kept = session_on(&env, "master-1").await;
    let mut leaving = session_on(&env, "master-3").await;
    let clients = load(&env);

    // master-3 leaves the endpoints (graceful shutdown) but still serves.
    let event = env.lab.cluster.as_ref().unwrap().set_endpoints(&endpoints(&[1, 2]));
    let drained =
        wait_servers(&env, "master-3 draining", |s| s.iter().any(|(n, st)| n == "master-3" && st == "DRAIN"))
            .await;
    let applied = drained - event;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let during = clients.stop().await;
    // Its established connection goes on while it drains…
    assert_eq!(leaving.served_by().await.unwrap(), "master-3");
    // …and the server is deleted once its sessions end or the drain limit
    // (hard_stop_after, 2s here) passes. (apilb's own discovery watch may
    // be one of them; a real API server closes it as it shuts down.)
    drop(leaving);
    wait_servers(&env, "master-3 deleted", |s| !s.iter().any(|(n, _)| n == "master-3")).await;

    assert!(applied <= Duration::from_secs(1), "applied {applied:?} after the watch event");
    assert_eq!(during.failed, 0, "{:?}", during.errors);
    let since = during.ok_since(drained);
    assert!(!since.contains_key("master-3"), "no new connection to the removed master: {since:?}");
    assert_eq!(worker(&env).await, before, "no reload");
    assert_eq!(kept.served_by().await.unwrap(), "master-1", "the connection to an unchanged master was kept");
    let s = env.agent().status().borrow().clone();
    assert_eq!(s.in_rotation().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["master-1", "master-2"]);
    eprintln!("remove: draining {applied:?} after the event; {} connections, 0 failed", during.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_all_masters_one_by_one() {
    let mut env = env_short_drain("").await;
    wait_discovered(&env, 3).await;
    let before = worker(&env).await;
    // A connection to master-3, which stays until the last step.
    let mut stays_long = session_on(&env, "master-3").await;
    let clients = load(&env);
    let cluster = env.lab.cluster.clone().unwrap();
    let mut current = vec![1, 2, 3];
    let mut slowest = Duration::ZERO;
    let mut newer = None;
    for (new, old) in [(4, 1), (5, 2), (6, 3)] {
        env.lab.add_server(new).await.unwrap();
        current.push(new);
        let event = cluster.set_endpoints(&endpoints(&current));
        let name = apilb_name(new);
        let t = wait_servers(&env, "added", |s| s.iter().any(|(n, _)| *n == name)).await;
        slowest = slowest.max(t - event);
        wait_servers(&env, "added UP", |s| s.iter().any(|(n, st)| *n == name && st == "UP")).await;
        if new == 4 {
            newer = Some(session_on(&env, "master-4").await);
        }
        if old == 3 {
            // Every change so far left master-3 and its connection alone.
            assert_eq!(stays_long.served_by().await.unwrap(), "master-3");
        }
        current.retain(|i| *i != old);
        let event = cluster.set_endpoints(&endpoints(&current));
        let gone = apilb_name(old);
        let t = wait_servers(&env, "removed", |s| s.iter().all(|(n, st)| *n != gone || st == "DRAIN")).await;
        slowest = slowest.max(t - event);
    }
    drop(stays_long);
    wait_servers(&env, "only the new masters", |s| {
        let names: Vec<&str> = s.iter().map(|(n, _)| n.as_str()).collect();
        names == ["127.0.0.4", "127.0.0.5", "127.0.0.6"]
    })
    .await;
    let report = clients.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    assert!(slowest <= Duration::from_secs(1), "slowest change applied {slowest:?} after its event");
    assert_eq!(worker(&env).await.0, before.0, "six changes, no reload: the same worker");
    let mut newer = newer.unwrap();
    assert_eq!(newer.served_by().await.unwrap(), "master-4", "a connection to a master that stayed was kept");
    let m = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(m.contains("apilb_master_changes_total{method=\"runtime\"} 6"), "{m}");
    assert!(m.contains("apilb_master_changes_total{method=\"reload\"} 0"), "{m}");
    env.agent = None;
    eprintln!(
        "replace all: 6 changes, slowest applied {slowest:?} after its event; {} connections, 0 failed",
        report.ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_uses_the_persisted_set_when_the_seeds_are_unreachable() {
    let mut env = env_with_discovery(cluster_opts(), "").await;
    wait_discovered(&env, 3).await;
    assert_eq!(env.stop_agent().await, apilb::agent::Exit::Stopped);
    assert!(layout(&env.lab).masters_file().exists());

    // The seeds now point at addresses where nothing listens.
    let port = env.lab.servers[0].addr().port();
    let dead = format!(
        "masters:\n  - {{name: gone-1, address: \"127.0.0.31:{port}\"}}\n  - {{name: gone-2, address: \"127.0.0.32:{port}\"}}\n"
    );
    let yaml = env.lab.config_yaml(&env.lab.discovery_yaml(""));
    let start = yaml.find("masters:\n").unwrap();
    let end = yaml.find("health:\n").unwrap();
    env.lab.write_config(&format!("{}{dead}{}", &yaml[..start], &yaml[end..])).unwrap();

    env.start_agent().await;
    let first = env.agent().status().borrow().clone();
    let sources: Vec<(&str, &str)> =
        first.masters.iter().map(|m| (m.name.as_str(), m.source.as_str())).collect();
    assert!(sources.iter().filter(|(_, s)| *s == "persisted").count() == 3, "{sources:?}");
    assert!(sources.iter().filter(|(_, s)| *s == "static").count() == 2, "{sources:?}");
    // The node reaches the cluster through the persisted masters…
    assert!(served_by(&env).await.is_ok());
    // …and discovery, through them, replaces everything with the truth.
    wait_discovered(&env, 3).await;
    let s = env.agent().status().borrow().clone();
    assert!(s.in_rotation().all(|m| !m.name.starts_with("gone")), "{:?}", s.masters);

    // A corrupt state file is reported and ignored, never fatal.
    env.stop_agent().await;
    std::fs::write(layout(&env.lab).masters_file(), "{corrupt").unwrap();
    let yaml = env.lab.config_yaml(&env.lab.discovery_yaml(""));
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    wait_discovered(&env, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_resource_version_makes_a_fresh_list() {
    let mut env = env_with_discovery(cluster_opts(), "").await;
    wait_discovered(&env, 3).await;
    let cluster = env.lab.cluster.clone().unwrap();
    let lists = cluster.counts().lists;
    cluster.expire();
    env.wait_status(Duration::from_secs(10), "a watch restart", |s| {
        s.discovery.as_ref().is_some_and(|d| d.watch_restarts >= 1)
    })
    .await;
    let t = Instant::now();
    while cluster.counts().lists == lists {
        assert!(t.elapsed() < Duration::from_secs(10), "no re-list after 410");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new watch works: a change after the re-list is applied.
    env.lab.add_server(4).await.unwrap();
    cluster.set_endpoints(&endpoints(&[1, 2, 3, 4]));
    wait_servers(&env, "127.0.0.4 added", |s| s.iter().any(|(n, _)| n == "127.0.0.4")).await;
    let m = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(m.contains("apilb_discovery_watch_restarts_total 1"), "{m}");
    env.agent = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_outside_allowed_cidrs_are_refused() {
    let mut env = env_with_discovery(cluster_opts(), "    allowed_cidrs: [127.0.0.0/30]\n").await;
    wait_discovered(&env, 3).await;
    env.lab.add_server(9).await.unwrap();
    env.lab.cluster.as_ref().unwrap().set_endpoints(&endpoints(&[1, 2, 3, 9]));
    let s = env
        .wait_status(Duration::from_secs(10), "a refusal", |s| {
            s.discovery.as_ref().is_some_and(|d| !d.refused.is_empty())
        })
        .await;
    let refused = &s.discovery.as_ref().unwrap().refused;
    assert!(
        refused[0].contains("127.0.0.9: outside discovery.kubernetes.allowed_cidrs (127.0.0.0/30)"),
        "{refused:?}"
    );
    assert_eq!(s.in_rotation().count(), 3);
    assert!(!servers(&env).await.iter().any(|(n, _)| n == "127.0.0.9"));
    env.agent = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_clusters_are_read_through_endpoints() {
    let env = env_with_discovery(
        LabOptions { cluster: Some(ClusterKind::EndpointsOnly), ..LabOptions::default() },
        "",
    )
    .await;
    wait_discovered(&env, 3).await;
    let s = env.agent().status().borrow().clone();
    assert_eq!(s.discovery.unwrap().api, "endpoints");
    assert!(
        env.lab
            .servers
            .iter()
            .all(|srv| srv.stats().unauthorized.load(std::sync::atomic::Ordering::SeqCst) == 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_keeps_the_discovered_masters_without_a_reload() {
    let mut env = Env::new(cluster_opts()).await;
    let yaml = env
        .lab
        .config_yaml(&env.lab.discovery_yaml(""))
        .replace("hard_stop_after: 1m", "hard_stop_after: 2s");
    env.lab.write_config(&yaml).unwrap();
    let mut first = AgentProcess::spawn(&env.lab, "first", &[]);
    first.wait_ready(&env.lab).await;
    let addr = env.lab.metrics;
    let discovered = move |n: usize| async move {
        apilb::status_client::fetch(addr).await.is_ok_and(|s| {
            s.discovery.as_ref().is_some_and(|d| d.last_success.is_some())
                && s.in_rotation().count() == n
                && s.in_rotation().all(|m| m.source == "discovered")
        })
    };
    eventually(Duration::from_secs(15), "discovery applied", || discovered(3)).await;

    // The cluster moves on: master-4 joins, master-3 leaves.
    env.lab.add_server(4).await.unwrap();
    let cluster = env.lab.cluster.clone().unwrap();
    cluster.set_endpoints(&endpoints(&[1, 2, 4]));
    let only_current = |s: &[(String, String)]| {
        s.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>() == ["master-1", "master-2", "127.0.0.4"]
    };
    wait_servers(&env, "the discovered set", only_current).await;
    let before = worker(&env).await;

    // Upgrade the agent: hand over, start the next one.
    first.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(first.wait_exit(Duration::from_secs(5)).expect("exited").success());
    let mut second = AgentProcess::spawn(&env.lab, "second", &[]);
    second.wait_ready(&env.lab).await;
    eventually(Duration::from_secs(15), "discovery applied again", || discovered(3)).await;
    wait_servers(&env, "the discovered set again", only_current).await;

    assert_eq!(worker(&env).await.0, before.0, "the same HAProxy worker: no reload");
    let logs = second.logs();
    assert!(logs.contains("aligning them at run time"), "{logs}");
    assert!(!logs.contains("reloaded HAProxy"), "{logs}");

    // `apilb reload` (systemctl reload) reports success although HAProxy
    // runs the discovered masters, not the ones in apilb.yaml.
    let (status, text) = support::apilb_reload(&env.lab, "10s").await;
    assert!(status.success(), "{text}");
    assert!(text.contains("applied"), "{text}");
}

// Hostile or broken answers of the API (docs/security.md). Every address in
// these tests is on loopback: whatever discovery decides, nothing here
// connects outside 127.0.0.0/8 (link-local and other ranges are refused
// in src/discovery's unit tests, where the set is decided).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_masters_are_refused_by_default_and_the_seeds_keep_serving() {
    // No allowed_cidrs: the lab's masters, all on 127.0.0.x, are refused.
    let env = env_with_discovery(cluster_opts(), "    allowed_cidrs: []\n").await;
    let s = env
        .wait_status(Duration::from_secs(15), "the discovered set rejected", |s| {
            s.discovery.as_ref().is_some_and(|d| d.rejected.is_some())
        })
        .await;
    let why = s.discovery.as_ref().unwrap().rejected.clone().unwrap();
    assert!(why.contains("refused the discovered set as a whole") && why.contains("is loopback"), "{why}");
    assert!(s.masters.iter().all(|m| m.source == "static"), "{:?}", s.masters);
    assert!(s.summary().contains("discovered masters rejected"), "{}", s.summary());
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("apilb_discovery_rejected 1"), "{metrics}");
    assert!(served_by(&env).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_over_max_masters_is_refused_and_the_last_good_set_serves() {
    let mut env = env_with_discovery(cluster_opts(), "    max_masters: 3\n").await;
    wait_discovered(&env, 3).await;
    env.lab.add_server(4).await.unwrap();
    env.lab.cluster.as_ref().unwrap().set_endpoints(&endpoints(&[1, 2, 3, 4]));
    let s = env
        .wait_status(Duration::from_secs(10), "rejected", |s| {
            s.discovery.as_ref().is_some_and(|d| d.rejected.is_some())
        })
        .await;
    let why = s.discovery.as_ref().unwrap().rejected.clone().unwrap();
    assert!(why.contains("4 masters, more than discovery.kubernetes.max_masters (3)"), "{why}");
    assert_eq!(s.in_rotation().count(), 3);
    assert!(!servers(&env).await.iter().any(|(n, _)| n == "127.0.0.4"));
    // Back within the cap: accepted again, the rejection cleared.
    env.lab.cluster.as_ref().unwrap().set_endpoints(&endpoints(&[1, 2, 4]));
    env.wait_status(Duration::from_secs(15), "accepted again", |s| {
        s.discovery.as_ref().is_some_and(|d| d.rejected.is_none())
            && s.in_rotation()
                .map(|m| m.address.clone())
                .collect::<Vec<_>>()
                .iter()
                .any(|a| a.starts_with("127.0.0.4:"))
    })
    .await;
    env.agent = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_api_servers_own_slice_counts() {
    let env = env_with_discovery(cluster_opts(), "").await;
    wait_discovered(&env, 3).await;
    let cluster = env.lab.cluster.as_ref().unwrap();
    // Anyone allowed to create slices in `default` can label one so.
    cluster.inject(
        "ADDED",
        serde_json::json!({"kind": "EndpointSlice", "metadata": {"name": "evil", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "kubernetes"}}, "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.9"]}], "ports": [{"name": "https", "port": 6443}]}),
    );
    // A real change after it: by then the foreign slice was read.
    cluster.set_endpoints(&endpoints(&[1, 2]));
    wait_servers(&env, "master-3 draining", |s| s.iter().any(|(n, st)| n == "master-3" && st == "DRAIN"))
        .await;
    let names: Vec<String> = servers(&env).await.into_iter().map(|(n, _)| n).collect();
    assert!(!names.iter().any(|n| n.contains("127.0.0.9")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_answers_are_bounded_and_escaped() {
    let env = env_with_discovery(cluster_opts(), "").await;
    wait_discovered(&env, 3).await;
    let cluster = env.lab.cluster.as_ref().unwrap();
    // A huge error text, with a forged log line and a terminal escape.
    let message = format!("boom\nWARN forged\x1b]0;owned\x07{}", "y".repeat(200_000));
    cluster.inject("ERROR", serde_json::json!({"kind": "Status", "code": 500, "message": message}));
    let s = env
        .wait_status(Duration::from_secs(10), "the error reported", |s| {
            s.discovery.as_ref().and_then(|d| d.last_error.as_ref()).is_some_and(|e| e.contains("error 500"))
        })
        .await;
    let e = s.discovery.as_ref().unwrap().last_error.clone().unwrap();
    assert!(e.len() < 500, "{} bytes kept", e.len());
    assert!(e.contains("boom\\nWARN forged\\u{1b}]0;owned\\u{7}") && !e.chars().any(char::is_control), "{e}");
    // The watch is back (its first bookmark clears the error)…
    env.wait_status(Duration::from_secs(15), "the watch back", |s| {
        s.discovery.as_ref().is_some_and(|d| d.last_error.is_none())
    })
    .await;
    // …when a huge event comes: refused by size, not kept.
    cluster.inject(
        "MODIFIED",
        serde_json::json!({"metadata": {"name": "kubernetes"}, "padding": "z".repeat(1 << 20)}),
    );
    env.wait_status(Duration::from_secs(15), "the huge event refused", |s| {
        s.discovery
            .as_ref()
            .and_then(|d| d.last_error.as_ref())
            .is_some_and(|e| e.contains("larger than 256 KiB"))
    })
    .await;
    assert_eq!(env.agent().status().borrow().in_rotation().count(), 3);
    // A list that sends its headers and stalls: given up within its bound.
    cluster.stall_lists(true);
    cluster.expire();
    let started = tokio::time::Instant::now();
    env.wait_status(Duration::from_secs(40), "the stalled list given up", |s| {
        s.discovery
            .as_ref()
            .and_then(|d| d.last_error.as_ref())
            .is_some_and(|e| e.contains("did not end within 15s"))
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(35), "{:?}", started.elapsed());
    cluster.stall_lists(false);
    assert_eq!(env.agent().status().borrow().in_rotation().count(), 3);
    assert!(served_by(&env).await.is_ok());
}
