//! apilb.yaml replaced by garbage, or by valid YAML with an invalid value,
//! while the agent runs under load: a reload request is refused with one
//! clear error naming the file and the cause, the agent keeps running,
//! HAProxy is not touched and no connection fails; fixing the file and
//! reloading applies.

use std::path::Path;
use std::time::{Duration, Instant};

use apilb::agent::Control;
use apilb::haproxy::stat::ProcInfo;
use apilb_testkit::lab::{Lab, LabOptions};
use apilb_testkit::testapi::{Load, Session};

use crate::common::*;
use crate::support::*;

/// A broken apilb.yaml and what the error must say about it.
struct Broken {
    what: &'static str,
    content: Vec<u8>,
    cause: &'static str,
}

fn broken_configs(lab: &Lab) -> Vec<Broken> {
    let good = std::fs::read_to_string(lab.config_path()).unwrap();
    vec![
        Broken {
            what: "garbage",
            content: b"\x00\xff\xfe\x7fELF garbage {{[[ \x1b\n\xc3\x28 ]]\n".to_vec(),
            cause: "stream did not contain valid UTF-8",
        },
        Broken {
            what: "truncated",
            content: good.as_bytes()[..good.find("health:").unwrap() + "health:\n  inter".len()].to_vec(),
            cause: "health",
        },
        Broken {
            what: "invalid value",
            content: good.replace("interval: 1s", "interval: often").into_bytes(),
            cause: "health.interval",
        },
    ]
}

fn write(path: &Path, content: &[u8]) {
    apilb::fsutil::write_atomic(path, content, 0o600).unwrap();
}

/// What must not change while the file is broken.
#[derive(Debug, PartialEq)]
struct DataPlane {
    master: u32,
    workers: Vec<u32>,
    reloads: u64,
    cfg: Vec<u8>,
}

async fn data_plane(lab: &Lab) -> DataPlane {
    let ProcInfo { master_pid, workers, reloads, .. } = show_proc(lab).await.unwrap();
    DataPlane {
        master: master_pid,
        workers: workers.iter().map(|w| w.pid).collect(),
        reloads,
        cfg: std::fs::read(layout(lab).config_file()).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_file_is_refused_by_a_reload_request() {
    let _serial = exclusive().await;
    let mut reaper = Reaper::default();
    let mut env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    env.start_agent().await;
    env.wait_all_up().await;
    let path = env.lab.config_path().display().to_string();
    let tls = env.lab.client_tls().unwrap();
    let mut held = Session::connect(env.lab.listen, tls.clone(), Some(&env.lab.token)).await.unwrap();
    let held_by = held.served_by().await.unwrap();
    let load = Load::start(env.lab.listen, tls, Some(env.lab.token.clone()), 2);
    let before = data_plane(&env.lab).await;
    let hash = env.agent().status().borrow().config.hash.clone();

    let mut lines = Vec::new();
    for (i, broken) in broken_configs(&env.lab).into_iter().enumerate() {
        let what = broken.what;
        write(&env.lab.config_path(), &broken.content);
        let requests = env.agent().status().borrow().config.reload_requests;
        env.agent().send(Control::Reload).await;
        let s = env
            .wait_status(Duration::from_secs(10), "the reload request handled", move |s| {
                s.config.reload_requests > requests
            })
            .await;
        let last = s.config.last_reload.clone().expect("a reload record");
        let error = s.config.pending_error.clone().expect("an error");
        assert_eq!(last.result, "invalid_config", "{what}: {last:?}");
        assert_eq!(last.message.as_deref(), Some(error.as_str()), "{what}");
        assert!(error.contains(&path), "{what}: the error names the file: {error}");
        assert!(error.contains(broken.cause), "{what}: the error names the cause: {error}");
        let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
        assert!(
            metric(&metrics, "apilb_haproxy_reloads_total{result=\"invalid_config\"}").unwrap_or(0.0)
                >= (i + 1) as f64,
            "{what}: {metrics}"
        );
        assert_eq!(s.config.hash, hash, "{what}");
        assert_eq!(data_plane(&env.lab).await, before, "{what}: HAProxy was touched");
        assert_eq!(held.served_by().await.unwrap(), held_by, "{what}");
        assert!(served_by(&env).await.is_ok(), "{what}");
        lines.push(format!("{what}: refused: {error}"));
    }

    // Fixed: the next reload request applies it.
    env.lab.write_config(&config_variant(&env.lab, 1, "")).unwrap();
    env.agent().send(Control::Reload).await;
    let s = env
        .wait_status(Duration::from_secs(15), "the fixed config applied", move |s| {
            s.config.hash != hash && s.config.last_reload.as_ref().is_some_and(|r| r.result == "success")
        })
        .await;
    assert!(s.config.pending_error.is_none());
    assert!(std::fs::read_to_string(layout(&env.lab).config_file()).unwrap().contains(&variant_line(1)));
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "new connections failed: {:?}", report.errors);
    assert_eq!(held.served_by().await.unwrap(), held_by, "the held connection survives the good reload too");
    for l in lines {
        measured("config garbage (Control::Reload)", &l);
    }
    measured(
        "config garbage (Control::Reload)",
        &format!(
            "new connections meanwhile: {} ok, 0 failed; HAProxy untouched until the fix applied",
            report.ok
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_file_fails_apilb_reload_and_the_agent_carries_on() {
    let _serial = exclusive().await;
    let mut reaper = Reaper::default();
    let env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    let mut agent = AgentProcess::spawn(&env.lab, "agent", &[]);
    agent.wait_ready(&env.lab).await;
    wait_remote_status(&env.lab, Duration::from_secs(15), "every master UP", all_up(3)).await;
    let path = env.lab.config_path().display().to_string();
    let tls = env.lab.client_tls().unwrap();
    let mut held = Session::connect(env.lab.listen, tls.clone(), Some(&env.lab.token)).await.unwrap();
    let held_by = held.served_by().await.unwrap();
    let load = Load::start(env.lab.listen, tls, Some(env.lab.token.clone()), 2);
    let before = data_plane(&env.lab).await;
    let hash = apilb::status_client::fetch(env.lab.metrics).await.unwrap().config.hash;

    let mut lines = Vec::new();
    for broken in broken_configs(&env.lab) {
        let what = broken.what;
        let logged_before = agent.logs().matches("configuration change not applied").count();
        write(&env.lab.config_path(), &broken.content);
        let (status, output) = apilb_reload(&env.lab, "20s").await;
        assert!(!status.success(), "{what}: apilb reload succeeded: {output}");
        assert!(output.contains(&path) && output.contains(broken.cause), "{what}: {output}");
        // The agent notices the file by itself and says so, once.
        let cause = broken.cause;
        let s =
            wait_remote_status(&env.lab, Duration::from_secs(10), "the agent reports the error", move |s| {
                s.config.pending_error.as_deref().is_some_and(|e| e.contains(cause))
            })
            .await;
        let error = s.config.pending_error.clone().unwrap();
        assert!(error.contains(&path), "{what}: {error}");
        // Two more reads of the file (one per second) do not repeat it.
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let logged = agent.logs().matches("configuration change not applied").count() - logged_before;
        assert_eq!(logged, 1, "{what}: logged {logged} times:\n{}", agent.logs());
        assert!(agent.child.try_wait().unwrap().is_none(), "{what}: the agent exited:\n{}", agent.logs());
        assert_eq!(s.config.hash, hash, "{what}");
        assert_eq!(data_plane(&env.lab).await, before, "{what}: HAProxy was touched");
        assert_eq!(held.served_by().await.unwrap(), held_by, "{what}");
        lines.push(format!(
            "{what}: apilb reload exited with {}: {}",
            status.code().unwrap_or(-1),
            output.trim().lines().last().unwrap_or("")
        ));
    }

    env.lab.write_config(&config_variant(&env.lab, 1, "")).unwrap();
    let fixing = Instant::now();
    let (status, output) = apilb_reload(&env.lab, "20s").await;
    assert!(status.success(), "{output}\n{}", agent.logs());
    assert!(output.contains("applied"), "{output}");
    let s = apilb::status_client::fetch(env.lab.metrics).await.unwrap();
    assert_ne!(s.config.hash, hash);
    assert!(s.config.pending_error.is_none());
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "new connections failed: {:?}", report.errors);
    assert_eq!(held.served_by().await.unwrap(), held_by);
    for l in lines {
        measured("config garbage (apilb reload)", &l);
    }
    measured(
        "config garbage (apilb reload)",
        &format!(
            "fixed file applied by apilb reload in {:.1?}; new connections meanwhile: {} ok, 0 failed",
            fixing.elapsed(),
            report.ok
        ),
    );
}
