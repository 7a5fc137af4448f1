//! What another local user, the network or a hostile API answer can do to
//! a node (docs/security.md): each test reproduces a finding of the
//! security review against the real agent and HAProxy.

mod support;

use std::time::Duration;

use apilb_testkit::lab::LabOptions;
use support::*;
use tokio::net::TcpStream;

/// Polls the agent's /status until `pred` holds (an apilb process).
async fn wait_remote(env: &Env, limit: Duration, what: &str, pred: impl Fn(&apilb::status::Status) -> bool) {
    let start = tokio::time::Instant::now();
    loop {
        if let Ok(s) = apilb::status_client::fetch(env.lab.metrics).await
            && pred(&s)
        {
            return;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_starve_neither_the_endpoint_nor_the_agent() {
    let env = Env::new(LabOptions::default()).await;
    // As in the finding: a low file descriptor limit, where 200 idle
    // connections used to take the descriptors the agent needs for
    // HAProxy's sockets and its own config file.
    env.lab.write_config(&env.lab.config_yaml("  maxconn: 50\n")).unwrap();
    let mut agent = AgentProcess::spawn_with_fd_limit(&env.lab, "agent", 256);
    agent.wait_ready(&env.lab).await;

    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(env.lab.metrics).await.expect("connect to the metrics endpoint"));
    }
    // /readyz answers while they are held…
    let (code, body) = http_get(env.lab.metrics, "/readyz").await;
    assert_eq!(code, 200, "{body}\n{}", agent.logs());
    // …and the agent still reads its config and talks to HAProxy.
    env.lab.write_config(&env.lab.config_yaml("  maxconn: 50\ntimeouts:\n  connect: 3100ms\n")).unwrap();
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_remote(&env, Duration::from_secs(15), "the change applied", |s| {
        s.config.reload_requests >= 1 && s.config.pending_error.is_none() && s.haproxy.running
    })
    .await;
    let cfg = std::fs::read_to_string(layout(&env.lab).config_file()).unwrap();
    assert!(cfg.contains("timeout connect 3100ms"), "{}", agent.logs());
    assert!(!agent.logs().contains("Too many open files"), "{}", agent.logs());
    drop(idle);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).is_some_and(|e| e.success()));
}

/// The uid a process runs as (the real one, from /proc).
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_workers_drop_root_and_the_master_keeps_it() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can drop to another user");
        return;
    }
    let haproxy =
        nix::unistd::User::from_name("haproxy").unwrap().expect("the haproxy user (Debian's package)");
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    let s = env.wait_all_up().await;
    let master = s.haproxy.master_pid.unwrap();
    assert_eq!(uid_of(master), 0, "the master reloads as root");
    for w in &s.haproxy.workers {
        assert_eq!(uid_of(*w), haproxy.uid.as_raw(), "worker {w} runs as root");
    }
    // The runtime API and a reload still work.
    env.lab.write_config(&env.lab.config_yaml("timeouts:\n  connect: 3100ms\n")).unwrap();
    env.agent().send(apilb::agent::Control::Reload).await;
    let before = s.haproxy.workers.clone();
    let s = env
        .wait_status(Duration::from_secs(10), "reloaded, new worker seen", |s| {
            s.config.last_reload.as_ref().is_some_and(|r| r.result == "success")
                && !s.haproxy.workers.is_empty()
                && s.haproxy.workers != before
        })
        .await;
    for w in &s.haproxy.workers {
        assert_eq!(uid_of(*w), haproxy.uid.as_raw());
    }
    assert!(served_by(&env).await.is_ok());
}
