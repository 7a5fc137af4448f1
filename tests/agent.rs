//! `apilb run` against the real HAProxy: start, stop, reloads under load,
//! refused configs, supervision, adoption, metrics and readiness.

mod support;

use std::time::Duration;

use apilb::agent::Exit;
use apilb_testkit::lab::LabOptions;
use apilb_testkit::testapi::Session;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_serves_and_stops() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    let status = env.wait_all_up().await;
    assert!(status.haproxy.running && status.haproxy.frontend_open);
    assert_eq!(status.check.auth, "client_cert");
    assert!(status.check.verified);
    let pid = env.haproxy_pid().expect("pidfile");
    assert!(alive(pid));

    let mut s =
        Session::connect(env.lab.listen, env.lab.client_tls().unwrap(), Some(&env.lab.token)).await.unwrap();
    let served = s.served_by().await.unwrap();
    assert!(served.starts_with("master-"), "{served}");
    // The checks authenticated with the node's client certificate.
    assert!(
        env.lab
            .servers
            .iter()
            .all(|srv| { srv.stats().by_cert.load(std::sync::atomic::Ordering::SeqCst) > 0 })
    );

    assert_eq!(env.stop_agent().await, Exit::Stopped);
    assert!(!alive(pid), "HAProxy still runs after a graceful stop");
    assert!(!layout(&env.lab).pidfile().exists());
    assert!(s.wait_closed(Duration::from_secs(5)).await, "connections end with HAProxy");
}

/// The config with one harmless knob changed, so each reload is real.
fn variant(env: &Env, i: usize) -> String {
    env.lab.config_yaml(&format!("timeouts:\n  connect: {}ms\n", 3100 + i))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_no_connection() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    let load = apilb_testkit::testapi::Load::start(
        env.lab.listen,
        env.lab.client_tls().unwrap(),
        Some(env.lab.token.clone()),
        4,
    );
    // Also a long-lived connection, like a watch: it must survive every
    // reload (the old worker keeps it until hard-stop-after).
    let mut watch =
        Session::connect(env.lab.listen, env.lab.client_tls().unwrap(), Some(&env.lab.token)).await.unwrap();
    let mut previous = env.agent().status().borrow().config.hash.clone();
    for i in 0..20 {
        env.lab.write_config(&variant(&env, i)).unwrap();
        env.agent().send(apilb::agent::Control::Reload).await;
        let before = previous.clone();
        let s = env
            .wait_status(Duration::from_secs(15), "reload applied", move |s| {
                s.config.hash != before
                    && s.config.last_reload.as_ref().is_some_and(|r| r.result == "success")
            })
            .await;
        previous = s.config.hash.clone();
        // Let the clients use the new worker for a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "failed connections during reloads: {:?}", report.errors);
    assert!(report.ok > 100, "too little traffic to mean anything: {}", report.ok);
    assert!(watch.served_by().await.is_ok(), "the long-lived connection did not survive the reloads");
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("apilb_haproxy_reloads_total{result=\"success\"} 20"), "{metrics}");
    // The watch pins one old worker at most per reload; hard-stop-after bounds them.
    let s = env.agent().status().borrow().clone();
    assert_eq!(s.haproxy.workers.len(), 1);
    eprintln!(
        "reloads: 20, connections ok: {}, failed: {}, old workers: {}",
        report.ok,
        report.failed,
        s.haproxy.old_workers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_and_the_old_one_keeps_serving() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    let before = env.wait_all_up().await;
    let worker = before.haproxy.workers.clone();
    let good = std::fs::read_to_string(layout(&env.lab).config_file()).unwrap();

    // 1. Broken YAML.
    let good_yaml = std::fs::read_to_string(env.lab.config_path()).unwrap();
    env.lab.write_config(&good_yaml.replace("masters:\n", "masters:\n  - 10.0.0.9\n")).unwrap();
    env.agent().send(apilb::agent::Control::Reload).await;
    let s = env.wait_status(Duration::from_secs(10), "refusal", |s| s.config.pending_error.is_some()).await;
    let err = s.config.pending_error.clone().unwrap();
    assert!(err.contains("masters[0]: \"10.0.0.9\" has no port"), "{err}");
    assert_eq!(s.config.last_reload.as_ref().unwrap().result, "invalid_config");
    assert_eq!(s.config.hash, before.config.hash);
    assert!(served_by(&env).await.is_ok());

    // 2. A config that HAProxy accepts with -c but cannot run: its new
    //    listener address does not exist on this machine. The reload fails
    //    in HAProxy; the old worker keeps serving and the file on disk is
    //    put back.
    env.lab
        .write_config(&good_yaml.replace(
            &format!("listen: \"{}\"", env.lab.listen),
            "expose: [listen]\nlisten: \"192.0.2.1:16443\"",
        ))
        .unwrap();
    env.agent().send(apilb::agent::Control::Reload).await;
    let s = env
        .wait_status(Duration::from_secs(15), "HAProxy refusal", |s| {
            s.config.last_reload.as_ref().is_some_and(|r| r.result == "refused")
        })
        .await;
    let msg = s.config.last_reload.as_ref().unwrap().message.clone().unwrap();
    assert!(msg.contains("cannot bind socket"), "HAProxy's own reason is reported: {msg}");
    assert_eq!(s.config.hash, before.config.hash);
    assert_eq!(
        std::fs::read_to_string(layout(&env.lab).config_file()).unwrap(),
        good,
        "last good config restored on disk"
    );
    assert!(served_by(&env).await.is_ok());
    // HAProxy's master reports the failed reload (3.1+ lists the serving
    // worker among its old workers: "recovery mode"); the status names the
    // worker that serves on every version.
    let s = env
        .wait_status(Duration::from_secs(5), "poll", |s| {
            !s.haproxy.workers.is_empty() && s.haproxy.last_reload_failed
        })
        .await;
    assert_eq!(s.haproxy.workers, worker, "the worker serving before is still the one serving");
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("apilb_haproxy_last_reload_failed 1"), "{metrics}");
    assert!(metrics.contains("apilb_haproxy_workers{kind=\"current\"} 1"), "{metrics}");

    // 3. Back to the good config: accepted without a reload (same hash).
    env.lab.write_config(&good_yaml).unwrap();
    env.agent().send(apilb::agent::Control::Reload).await;
    let s =
        env.wait_status(Duration::from_secs(10), "error cleared", |s| s.config.pending_error.is_none()).await;
    // Nothing was reloaded, so HAProxy still reports its failed reload.
    assert!(s.summary().ends_with("; HAProxy's last reload failed"), "{}", s.summary());
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("apilb_haproxy_reloads_total{result=\"invalid_config\"} 1"), "{metrics}");
    assert!(metrics.contains("apilb_haproxy_reloads_total{result=\"refused\"} 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_config_file_is_applied_without_a_signal() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    let before = env.wait_all_up().await;
    env.lab.write_config(&variant(&env, 7)).unwrap();
    let s = env
        .wait_status(Duration::from_secs(10), "file change applied", |s| s.config.hash != before.config.hash)
        .await;
    assert_eq!(s.config.last_reload.unwrap().result, "success");
    assert!(
        std::fs::read_to_string(layout(&env.lab).config_file()).unwrap().contains("timeout connect 3107ms")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_haproxy_master_is_back_within_two_seconds() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    let pid = env.haproxy_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let took = eventually(Duration::from_secs(5), "frontend serving again", || async {
        served_by(&env).await.is_ok()
    })
    .await;
    assert!(took < Duration::from_secs(2), "serving again after {took:?}");
    let s = env.wait_status(Duration::from_secs(5), "restart counted", |s| s.haproxy.restarts == 1).await;
    assert_ne!(s.haproxy.master_pid, Some(pid));
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(metrics.contains("apilb_haproxy_restarts_total 1"), "{metrics}");
    eprintln!("serving again {took:?} after kill -9 of the master");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_leaves_traffic_alone_and_the_next_one_adopts() {
    let env = Env::new(LabOptions::default()).await;
    let mut first = AgentProcess::spawn(&env.lab, "first", &[]);
    first.wait_ready(&env.lab).await;
    let pid = env.haproxy_pid().unwrap();
    let tls = env.lab.client_tls().unwrap();
    let mut held = Session::connect(env.lab.listen, tls.clone(), Some(&env.lab.token)).await.unwrap();
    let server = held.served_by().await.unwrap();

    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(5)).expect("apilb died");
    assert!(alive(pid), "HAProxy died with the agent");
    assert_eq!(held.served_by().await.unwrap(), server, "the established connection is untouched");
    assert!(served_by(&env).await.is_ok(), "new connections are served without an agent");

    let mut second = AgentProcess::spawn(&env.lab, "second", &[]);
    second.wait_ready(&env.lab).await;
    assert_eq!(
        env.haproxy_pid(),
        Some(pid),
        "the second agent adopted the master instead of starting another"
    );
    assert!(second.logs().contains("adopted the running HAProxy master"), "{}", second.logs());
    assert_eq!(held.served_by().await.unwrap(), server, "the established connection survived the adoption");
    let status = apilb::status_client::fetch(env.lab.metrics).await.unwrap();
    assert!(status.haproxy.adopted);
    assert_eq!(status.haproxy.master_pid, Some(pid));

    // A handover (SIGUSR2) exits and leaves HAProxy for the next agent too.
    second.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(second.wait_exit(Duration::from_secs(5)).expect("exited").success());
    assert!(alive(pid));
    assert_eq!(held.served_by().await.unwrap(), server);

    let mut third = AgentProcess::spawn(&env.lab, "third", &[]);
    third.wait_ready(&env.lab).await;
    assert_eq!(env.haproxy_pid(), Some(pid));
    third.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(third.wait_exit(Duration::from_secs(10)).expect("exited").success(), "{}", third.logs());
    assert!(!alive(pid), "SIGTERM stops HAProxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_every_series() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    env.lab.servers[1].crash();
    env.wait_status(Duration::from_secs(10), "master-2 DOWN", |s| s.masters[1].state == "DOWN").await;
    let m = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    for needle in [
        "apilb_master_up{master=\"master-1\"} 1",
        "apilb_master_up{master=\"master-2\"} 0",
        "apilb_master_state{master=\"master-2\",state=\"DOWN\"} 1",
        "apilb_master_state{master=\"master-1\",state=\"UP\"} 1",
        "apilb_master_check_status{master=\"master-1\",status=\"L7OK\"} 1",
        "apilb_master_check_status{master=\"master-2\",status=\"L4CON\"} 1",
        "apilb_master_check_http_code{master=\"master-1\"} 200",
        "apilb_master_check_duration_seconds{master=\"master-1\"}",
        "apilb_master_sessions{master=\"master-1\"}",
        "apilb_master_fallback_sessions{master=\"master-1\"} 0",
        "apilb_master_transitions_total{master=\"master-2\",to=\"DOWN\"} 1",
        "apilb_master_last_transition_timestamp_seconds{master=\"master-2\"}",
        "apilb_master_info{address=\"",
        "apilb_masters_configured 3",
        "apilb_masters_healthy 2",
        "apilb_haproxy_up 1",
        "apilb_haproxy_reloads_total{result=\"success\"} 0",
        "apilb_haproxy_restarts_total 0",
        "apilb_haproxy_workers{kind=\"current\"} 1",
        "apilb_config_info{hash=\"",
        "apilb_config_last_apply_timestamp_seconds",
        "apilb_check_auth_info{mode=\"client_cert\",verified=\"true\"} 1",
        "apilb_check_bootstrap 0",
        "apilb_build_info{haproxy_version=\"",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(m.contains(needle), "missing {needle:?} in:\n{m}");
    }
    // The old check status of master-2 is not left behind.
    assert!(!m.contains("apilb_master_check_status{master=\"master-2\",status=\"L7OK\"}"), "{m}");
    assert_eq!(http_get(env.agent().metrics_addr(), "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_when_every_master_is_down() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    let addr = env.agent().metrics_addr();
    assert_eq!(http_get(addr, "/readyz").await, (200, "ok\n".into()));
    for s in &env.lab.servers {
        s.set_readyz(503);
    }
    env.wait_status(Duration::from_secs(10), "all DOWN", |s| s.healthy() == 0).await;
    let (code, body) = http_get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("no healthy master (0/3)"), "{body}");
    // Fail open: the node still reaches the API servers.
    assert!(served_by(&env).await.is_ok());
    let status = http_get(addr, "/status").await;
    assert_eq!(status.0, 200);
    assert!(status.1.contains("\"state\": \"DOWN\""), "{}", status.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_stats_and_exporter_require_auth() {
    let mut env = Env::new(LabOptions::default()).await;
    // A password with every character that is special to haproxy.cfg.
    let password = "p'a\"s$HOME #x\\y%z";
    std::fs::write(env.lab.path("stats-password"), format!("{password}\n")).unwrap();
    let port = apilb_testkit::lab::free_port(None).unwrap();
    let yaml = env.lab.config_yaml(&format!(
        "stats:\n  listen: 127.0.0.1:{port}\n  auth: {{user: admin, password_file: {}}}\n",
        env.lab.path("stats-password").display()
    ));
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    env.wait_all_up().await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(http_get(addr, "/metrics").await.0, 401, "/metrics without credentials");
    assert_eq!(http_get(addr, "/").await.0, 401, "stats page without credentials");
    let basic = |user: &str, pw: &str| {
        use std::io::Write;
        let mut enc = Vec::new();
        let raw = format!("{user}:{pw}");
        // Minimal base64 for the test.
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for chunk in raw.as_bytes().chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    enc.write_all(&[T[((n >> (18 - 6 * i)) & 63) as usize]]).unwrap();
                } else {
                    enc.write_all(b"=").unwrap();
                }
            }
        }
        String::from_utf8(enc).unwrap()
    };
    let get = |auth: String| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!(
                "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.unwrap();
        buf
    };
    let ok = get(basic("admin", password)).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{}", &ok[..ok.len().min(300)]);
    assert!(ok.contains("haproxy_server_status"), "HAProxy's exporter answers");
    let bad = get(basic("admin", "wrong")).await;
    assert!(bad.starts_with("HTTP/1.1 401"));
    // The password never reaches apilb's own outputs.
    let status = http_get(env.agent().metrics_addr(), "/status").await.1;
    let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
    assert!(!status.contains(password) && !metrics.contains(password));
    let cfg = std::fs::metadata(layout(&env.lab).config_file()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(cfg.permissions().mode() & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_stop_request_forces_the_stop() {
    let mut env = Env::new(LabOptions::default()).await;
    // A long grace period that a held connection would use up.
    let handle = apilb::agent::start(apilb::agent::Options {
        config_path: env.lab.config_path(),
        shutdown_grace: Duration::from_secs(60),
    })
    .await
    .unwrap();
    env.agent = Some(handle);
    env.wait_all_up().await;
    let pid = env.haproxy_pid().unwrap();
    let mut held =
        Session::connect(env.lab.listen, env.lab.client_tls().unwrap(), Some(&env.lab.token)).await.unwrap();
    held.served_by().await.unwrap();
    let h = env.agent.take().unwrap();
    h.send(apilb::agent::Control::Shutdown).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(pid), "the graceful stop waits for the held connection");
    let started = std::time::Instant::now();
    h.send(apilb::agent::Control::Shutdown).await;
    assert_eq!(h.wait().await, Exit::Forced);
    assert!(started.elapsed() < Duration::from_secs(5), "forced stop took {:?}", started.elapsed());
    assert!(!alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_master_name_does_not_stop_haproxy() {
    let mut env = Env::new(LabOptions::default()).await;
    // DNS down at boot, or a name that does not exist (yet).
    let yaml = env.lab.config_yaml("").replace(
        "masters:\n",
        "masters:\n  - {name: by-name, address: \"master-x.does-not-exist.invalid:6443\"}\n",
    );
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    let s = env
        .wait_status(Duration::from_secs(15), "the named master in maintenance, the others UP", |s| {
            s.masters.len() == 4
                && s.masters[0].state == "MAINT"
                && s.masters[1..].iter().all(|m| m.state == "UP" && m.check_status == "L7OK")
        })
        .await;
    assert_eq!(s.healthy(), 3);
    assert!(served_by(&env).await.is_ok());
    let cfg = std::fs::read_to_string(layout(&env.lab).config_file()).unwrap();
    assert!(cfg.contains("resolvers sys init-addr last,libc,none"), "{cfg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_workers_are_bounded_by_hard_stop_after() {
    let mut env = Env::new(LabOptions::default()).await;
    let yaml = env.lab.config_yaml("").replace("hard_stop_after: 1m", "hard_stop_after: 2s");
    env.lab.write_config(&yaml).unwrap();
    env.start_agent().await;
    env.wait_all_up().await;
    // A long-lived connection (a watch) pins the old worker after a reload…
    let mut watch =
        Session::connect(env.lab.listen, env.lab.client_tls().unwrap(), Some(&env.lab.token)).await.unwrap();
    watch.served_by().await.unwrap();
    env.lab.write_config(&yaml.replace("hard_stop_after: 2s", "hard_stop_after: 2001ms")).unwrap();
    env.agent().send(apilb::agent::Control::Reload).await;
    env.wait_status(Duration::from_secs(10), "an old worker", |s| s.haproxy.old_workers.len() == 1).await;
    assert!(watch.served_by().await.is_ok(), "the old worker still serves the connection");
    // …until hard-stop-after closes it; the client reconnects to the new one.
    let closed_in = std::time::Instant::now();
    assert!(watch.wait_closed(Duration::from_secs(10)).await, "the old worker never let go");
    env.wait_status(Duration::from_secs(10), "no old worker", |s| s.haproxy.old_workers.is_empty()).await;
    assert!(served_by(&env).await.is_ok());
    eprintln!(
        "old worker closed its last connection {:?} after the reload was confirmed",
        closed_in.elapsed()
    );
}
