//! apilb's persistent checker (`apilb::check`) against the real-TLS test
//! API servers of the test kit,
//! with the credential and CA read the way the agent reads them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use apilb::check::*;
use apilb_testkit::lab::{Lab, LabAuth, LabOptions};
use tokio::time::Instant;

/// Fast timings so each test takes about a second.
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(300);

/// A lab with one master, and the checker settings and TLS the lab's
/// apilb.yaml gives (with fast timings).
async fn setup(auth: LabAuth) -> (Lab, Arc<Settings>, Arc<rustls::ClientConfig>) {
    let lab = Lab::start(LabOptions { masters: 1, auth, ..LabOptions::default() }).await.expect("lab");
    let (config, inputs) = apilb::load_parts(&lab.config_path()).expect("config");
    let mut s = Settings::from_config(&config, &inputs);
    s.interval = INTERVAL;
    s.fastinter = INTERVAL / 4;
    s.timeout = TIMEOUT;
    s.connect_timeout = TIMEOUT;
    s.phase = Duration::ZERO;
    let tls = client_config(&inputs).expect("tls");
    (lab, Arc::new(s), tls)
}

fn start(lab: &Lab, settings: &Arc<Settings>, tls: &Arc<rustls::ClientConfig>) -> Checker {
    let target = Target { name: "master-1".into(), address: lab.servers[0].addr().to_string() };
    Checker::spawn(target, settings.clone(), tls.clone()).expect("checker")
}

/// Waits until the verdict satisfies `pred`; returns how long that took.
async fn until(c: &Checker, limit: Duration, pred: impl Fn(&Verdict) -> bool) -> Duration {
    let t = Instant::now();
    let mut rx = c.watch();
    match tokio::time::timeout(limit, rx.wait_for(|r| pred(&r.verdict))).await {
        Ok(Ok(_)) => t.elapsed(),
        _ => panic!("verdict not reached within {limit:?}: {:?}", c.report()),
    }
}

#[tokio::test]
async fn up_over_one_kept_alive_connection() {
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), |v| *v == Verdict::Up { code: 200 }).await;
    // Many more checks, one handshake, one TCP connection on the server.
    tokio::time::sleep(INTERVAL * 8).await;
    let r = c.report();
    assert!(r.checks >= 8, "{r:?}");
    assert_eq!(r.handshakes, 1, "{r:?}");
    let stats = lab.servers[0].stats();
    assert_eq!(stats.connections.load(Ordering::SeqCst), 1);
    assert!(stats.by_cert.load(Ordering::SeqCst) >= 8, "the client certificate authenticated every check");
}

#[tokio::test]
async fn bearer_token_is_sent() {
    let (lab, s, tls) = setup(LabAuth::Bearer).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    assert!(lab.servers[0].stats().by_token.load(Ordering::SeqCst) >= 2);
}

#[tokio::test]
async fn a_503_is_down_then_recovery_is_up() {
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    lab.servers[0].set_readyz(503);
    // fall 2: at most one interval and one fastinter (plus the answers).
    let took = until(&c, Duration::from_secs(3), |v| *v == Verdict::Down(Failure::Status(503))).await;
    assert!(took < INTERVAL + s.fastinter + Duration::from_millis(400), "{took:?}");
    assert_eq!(c.report().verdict.code(), Some(503));
    lab.servers[0].set_readyz(200);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    assert_eq!(c.report().handshakes, 1, "a 503 does not cost a new connection");
}

#[tokio::test]
async fn a_hang_is_down_within_the_timeout() {
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    lab.servers[0].hang();
    let took = until(&c, Duration::from_secs(5), Verdict::is_down).await;
    assert!(matches!(c.report().verdict, Verdict::Down(Failure::Timeout(_))), "{:?}", c.report());
    // fall 2: interval + timeout + fastinter + timeout, plus slack.
    let bound = INTERVAL + TIMEOUT + s.fastinter + TIMEOUT + Duration::from_millis(400);
    assert!(took < bound, "{took:?} > {bound:?}");
    lab.servers[0].resume();
    until(&c, Duration::from_secs(5), Verdict::is_up).await;
}

#[tokio::test]
async fn a_slow_answer_within_the_timeout_is_not_a_hang() {
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    // Frozen for less than the timeout, every check: answers come late.
    for _ in 0..4 {
        lab.servers[0].hang();
        tokio::time::sleep(TIMEOUT / 3).await;
        lab.servers[0].resume();
        tokio::time::sleep(INTERVAL - TIMEOUT / 3).await;
    }
    let r = c.report();
    assert!(r.verdict.is_up(), "{r:?}");
}

#[tokio::test]
async fn a_crash_is_down_at_once_and_the_restart_is_up() {
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    lab.servers[0].crash();
    // The kept connection closing pulls the checks forward: fall checks a
    // fastinter apart, not an interval.
    let took = until(&c, Duration::from_secs(3), Verdict::is_down).await;
    assert!(matches!(c.report().verdict, Verdict::Down(Failure::Connect(_))), "{:?}", c.report());
    assert!(took < s.fastinter * 2 + Duration::from_millis(400), "{took:?}");
    lab.servers[0].restart().await.expect("restart");
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
}

#[tokio::test]
async fn an_idle_close_by_the_server_is_not_a_failure() {
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    let mut rx = c.watch();
    rx.borrow_and_update();
    // restart = crash + listen again at once: the kept connection is
    // closed, the fresh one succeeds.
    lab.servers[0].restart().await.expect("restart");
    tokio::time::sleep(INTERVAL * 3).await;
    let r = c.report();
    assert!(r.verdict.is_up(), "{r:?}");
    assert!(!rx.has_changed().unwrap_or(true), "no transition: {r:?}");
    assert_eq!(r.handshakes, 2);
}

#[tokio::test]
async fn bootstrap_accepts_401_and_strict_does_not() {
    let (lab, s, _) = setup(LabAuth::ClientCert).await;
    // No client certificate: the server answers 401, as kube-apiserver
    // with anonymous auth off does.
    let anonymous = apilb_testkit::testapi::client_tls(&lab.pki.ca_pem(), None).expect("tls");
    let strict = Arc::new(Settings { accept: vec![200], ..(*s).clone() });
    let c = start(&lab, &strict, &anonymous);
    until(&c, Duration::from_secs(3), |v| *v == Verdict::Down(Failure::Status(401))).await;
    let boot = Arc::new(Settings { accept: vec![200, 401, 403], ..(*s).clone() });
    let c = start(&lab, &boot, &anonymous);
    until(&c, Duration::from_secs(3), |v| *v == Verdict::Up { code: 401 }).await;
}

#[test]
fn phases_spread_over_the_interval() {
    let i = Duration::from_secs(1);
    let phases: Vec<Duration> = (0..1000).map(|n| phase_for(&format!("node-{n}"), i)).collect();
    assert!(phases.iter().all(|p| *p < i));
    // Every tenth of the interval gets some nodes.
    for decile in 0..10 {
        let n = phases.iter().filter(|p| p.as_millis() / 100 == decile).count();
        assert!((50..=150).contains(&n), "decile {decile}: {n}");
    }
}

#[tokio::test]
async fn with_fall_1_a_hang_is_down_within_interval_plus_timeout() {
    // The kept connection's proposed setting: a timeout on a connection
    // that answered an interval ago, a 503 or a refused connection is
    // believed at once (a stale connection is already retried fresh).
    let (lab, s, tls) = setup(LabAuth::ClientCert).await;
    let s = Arc::new(Settings { fall: 1, ..(*s).clone() });
    let c = start(&lab, &s, &tls);
    until(&c, Duration::from_secs(3), Verdict::is_up).await;
    lab.servers[0].hang();
    let took = until(&c, Duration::from_secs(3), Verdict::is_down).await;
    let bound = INTERVAL + TIMEOUT + Duration::from_millis(300);
    assert!(took < bound, "{took:?} > {bound:?}");
}

#[test]
fn verdicts_become_runtime_commands() {
    use apilb::check::push::command;
    assert_eq!(
        command("masters", "m1", &Verdict::Up { code: 200 }).as_deref(),
        Some("set server masters/m1 health up")
    );
    assert_eq!(
        command("masters", "m1", &Verdict::Down(Failure::Status(503))).as_deref(),
        Some("set server masters/m1 health down")
    );
    assert_eq!(command("masters", "m1", &Verdict::Unknown), None);
}
