//! What another local user, the network or a hostile API answer can do to
//! a node (docs/security.md): each test reproduces a finding of the
//! security review against the real agent and HAProxy.

mod support;

use std::time::Duration;

use apilb::lab::LabOptions;
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
    let cfg = std::fs::read_to_string(env.lab.path("run/haproxy.cfg")).unwrap();
    assert!(cfg.contains("timeout connect 3100ms"), "{}", agent.logs());
    assert!(!agent.logs().contains("Too many open files"), "{}", agent.logs());
    drop(idle);
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).is_some_and(|e| e.success()));
}
