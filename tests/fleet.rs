//! `health.checker: persistent` with the real HAProxy and test API
//! servers: apilb's checker keeps one connection per master and pushes its
//! verdicts through the runtime API; HAProxy's own check runs as a slow
//! backstop. Settings as docs/health-checks.md advises for 1 s detection:
//! interval 1s, timeout 1s, rise 2, fall 1.
//!
//! The bounds asserted are the (a 503 out within 1.5 s, a hang
//! within 2 s), plus the same scheduling slack as tests/failover.rs; each
//! test prints what it measured. HAProxy's state is polled every 20 ms
//! through its runtime API.

mod support;

use std::time::Duration;

use apilb_testkit::lab::LabOptions;
use support::*;
use tokio::time::Instant;

/// A 503 is seen at the next check: one interval.
const DOWN_503: Duration = Duration::from_millis(1500);
/// A hang: the next check plus its timeout.
const DOWN_HANG: Duration = Duration::from_secs(2);
/// Back in rotation: the next check plus rise-1 fast ones.
const UP: Duration = Duration::from_millis(1250);
/// Scheduling noise allowed on top of each bound (a loaded 2-core CI box).
const SLACK: Duration = Duration::from_millis(1000);

/// A lab of three masters configured for the persistent checker, with
/// HAProxy's check every `backstop`.
async fn lab_env(backstop: &str) -> Env {
    let mut env = Env::new(LabOptions::default()).await;
    env.lab.health.fall = 1;
    env.lab.health.extra = format!("  checker: persistent\n  backstop_interval: {backstop}\n");
    env.lab.write_config(&env.lab.config_yaml("")).expect("config");
    env
}

/// Three masters, all up by the persistent checker of an agent in this
/// process.
async fn env_up(backstop: &str) -> Env {
    let mut env = lab_env(backstop).await;
    env.start_agent().await;
    let addr = env.agent().metrics_addr();
    wait_checker_up(addr, env.lab.servers.len()).await;
    env
}

/// Waits for the checker's verdicts (HAProxy's first backstop check may be
/// a whole backstop interval away).
async fn wait_checker_up(metrics: std::net::SocketAddr, n: usize) {
    eventually(Duration::from_secs(15), "every master up by apilb's check", || async {
        let (_, text) = http_get(metrics, "/metrics").await;
        text.lines()
            .filter(|l| l.starts_with("apilb_checker_verdict{") && l.contains("verdict=\"up\"} 1"))
            .count()
            == n
    })
    .await;
}

/// The value of a metric series from the agent's `/metrics`.
async fn metric(env: &Env, series: &str) -> f64 {
    let (_, text) = http_get(env.agent().metrics_addr(), "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_out_within_one_and_a_half_seconds_over_kept_connections() {
    let env = env_up("30s").await;
    // The render: HAProxy's check is the backstop, and the agent closes
    // sessions (HAProxy's shutdown-sessions would race redispatches).
    let cfg = std::fs::read_to_string(layout(&env.lab).config_file()).expect("haproxy.cfg");
    assert!(cfg.contains("inter 30s fastinter 1s downinter 30s rise 2 fall 2"), "{cfg}");
    assert!(!cfg.contains("on-marked-down shutdown-sessions"), "{cfg}");

    let mut held = session_on(&env, "master-2").await;
    let failing = Instant::now();
    env.lab.servers[1].set_readyz(503);
    let down = wait_state(&env, "master-2", "DOWN", DOWN_503 + SLACK * 3).await;
    assert!(
        held.wait_closed(Duration::from_secs(1)).await,
        "the session on the unready master was not closed"
    );
    let took = down - failing;
    assert!(took <= DOWN_503 + SLACK, "out of rotation after {took:?}, bound {DOWN_503:?}");

    env.lab.servers[1].set_readyz(200);
    let back = Instant::now();
    let up = wait_state(&env, "master-2", "UP", UP + SLACK * 3).await;
    assert!(up - back <= UP + SLACK, "back after {:?}, bound {UP:?}", up - back);

    // Kept connections: many checks, one handshake per master.
    let checks = metric(&env, "apilb_checker_checks_total{master=\"master-1\"}").await;
    let handshakes = metric(&env, "apilb_checker_tls_handshakes_total{master=\"master-1\"}").await;
    assert!(checks >= 3.0 && handshakes <= 1.0, "{checks} checks, {handshakes} handshakes");
    eprintln!(
        "503: DOWN after {took:?} (bound {DOWN_503:?}), UP {:?} after recovery; master-1: {checks} checks over \
         {handshakes} TLS handshake(s)",
        up - back
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_master_is_out_within_two_seconds_and_its_sessions_closed() {
    let env = env_up("30s").await;
    let mut held = session_on(&env, "master-2").await;
    let clients = client_load(&env);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hung = Instant::now();
    env.lab.servers[1].hang();
    let down = wait_state(&env, "master-2", "DOWN", DOWN_HANG + SLACK * 3).await;
    assert!(held.wait_closed(Duration::from_secs(1)).await, "the session on the hung master was not closed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = clients.stop().await;
    let took = down - hung;
    assert!(took <= DOWN_HANG + SLACK, "marked DOWN after {took:?}, bound {DOWN_HANG:?}");
    let settled = (down + Duration::from_millis(100)).into_std();
    let after = report.failed_since(settled);
    assert!(after.is_empty(), "failures after mark-down: {after:?} ({})", describe(&report));
    eprintln!("hang: DOWN after {took:?} (bound {DOWN_HANG:?}); {}", describe(&report));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_master_fails_no_new_connection() {
    let env = env_up("30s").await;
    let clients = client_load(&env);
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.lab.servers[1].crash();
    let crashed = Instant::now();
    let down = wait_state(&env, "master-2", "DOWN", DOWN_503 + SLACK * 3).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = clients.stop().await;
    // Only requests in flight on master-2 when it died may fail: none
    // opened after the crash, not even at the mark-down (HAProxy's
    // shutdown-sessions is not rendered with this checker).
    let after = report.failed_since(crashed.into_std());
    assert!(after.is_empty(), "connections opened after the crash failed: {after:?} ({})", describe(&report));
    assert!(report.ok > 50, "{}", describe(&report));
    eprintln!(
        "crash: DOWN after {:?}; {} connections opened after the crash, 0 failed; {} cut in flight at the crash",
        down - crashed,
        report.ok_since(crashed.into_std()).values().sum::<u64>(),
        report.cut_at(crashed.into_std()).len(),
    );
}

/// The agent is SIGKILLed and not restarted: HAProxy's backstop check
/// takes a failing master out and brings it back, including one the agent
/// had marked down before it died (no server stays stuck down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_the_backstop_takes_a_failing_master_out_and_back() {
    let env = lab_env("2s").await;
    let mut agent = AgentProcess::spawn(&env.lab, "killed", &[]);
    agent.wait_ready(&env.lab).await;
    wait_checker_up(env.lab.metrics, env.lab.servers.len()).await;
    // Marked down by the agent, which then dies.
    env.lab.servers[1].set_readyz(503);
    wait_state(&env, "master-2", "DOWN", DOWN_503 + SLACK * 3).await;
    agent.signal(nix::sys::signal::Signal::SIGKILL);
    agent.wait_exit(Duration::from_secs(5)).expect("apilb died");
    // Recovers with no agent: the backstop (downinter 2s, rise 2, fastinter
    // 1s) brings it back.
    env.lab.servers[1].set_readyz(200);
    let t = Instant::now();
    let backstop_up = Duration::from_secs(2) + Duration::from_secs(1) + SLACK * 2;
    let up = wait_state(&env, "master-2", "UP", backstop_up * 2).await;
    assert!(up - t <= backstop_up, "back after {:?} with the agent dead", up - t);
    // Fails with no agent: the backstop (inter 2s, then fall 2 checks 1s
    // apart) takes it out, and back when it recovers.
    env.lab.servers[2].set_readyz(503);
    let t2 = Instant::now();
    let backstop_down = Duration::from_secs(2) + Duration::from_secs(1) + SLACK * 2;
    let down = wait_state(&env, "master-3", "DOWN", backstop_down * 2).await;
    assert!(down - t2 <= backstop_down, "out after {:?} with the agent dead", down - t2);
    env.lab.servers[2].set_readyz(200);
    let t3 = Instant::now();
    let up3 = wait_state(&env, "master-3", "UP", backstop_up * 2).await;
    assert!(served_by(&env).await.is_ok(), "new connections are served without an agent");
    env.lab.kill_haproxy();
    eprintln!(
        "agent SIGKILLed: a master it had marked down back {:?} after recovering; another out {:?} after \
         failing, back {:?} after recovering",
        up - t,
        down - t2,
        up3 - t3
    );
}
