//! The runtime and state directories full (ENOSPC) or read-only while a
//! configuration change is applied: the change is refused with the cause
//! and the path, HAProxy keeps serving the last good config (same worker,
//! same haproxy.cfg), and once the directory is writable again the change
//! applies.

use std::time::{Duration, Instant};

use apilb::agent::Control;
use apilb_testkit::lab::LabOptions;
use apilb_testkit::testapi::{Load, Session};

use crate::common::*;
use crate::support::*;

#[derive(Clone, Copy, Debug)]
enum Fault {
    Full,
    ReadOnly,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_or_read_only_directories_refuse_the_change_and_keep_serving() {
    let _serial = exclusive().await;
    let mut reaper = Reaper::default();
    // Small tmpfs mounts as the lab's runtime_dir and state_dir, made before
    // the agent creates them. Declared before `env`, so they are unmounted
    // after the Env's cleanup has read HAProxy's pidfile from them.
    let mut mounts = Vec::new();
    let mut env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    for dir in ["run", "state"] {
        match Tmpfs::mount(&env.lab, dir, 1 << 20) {
            Ok(m) => mounts.push(m),
            Err(e) => {
                measured("disk", &format!("skipped: {e} (needs root or CAP_SYS_ADMIN)"));
                return;
            }
        }
    }
    env.start_agent().await;
    env.wait_all_up().await;
    let tls = env.lab.client_tls().unwrap();
    let mut held = Session::connect(env.lab.listen, tls.clone(), Some(&env.lab.token)).await.unwrap();
    let held_by = held.served_by().await.unwrap();
    let load = Load::start(env.lab.listen, tls, Some(env.lab.token.clone()), 2);

    let mut variant = 0;
    let mut lines = Vec::new();
    for (m, dir) in mounts.iter().zip(["runtime_dir", "state_dir"]) {
        for fault in [Fault::Full, Fault::ReadOnly] {
            let before = env.agent().status().borrow().clone();
            let proc = show_proc(&env.lab).await.unwrap();
            let cfg = std::fs::read(layout(&env.lab).config_file()).unwrap();
            let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
            let failed_before = metric(&metrics, "apilb_haproxy_reloads_total{result=\"failed\"}").unwrap();

            let (filler, cause) = match fault {
                Fault::Full => (Some(m.fill()), "No space left on device"),
                Fault::ReadOnly => {
                    m.set_read_only(true).unwrap();
                    (None, "Read-only file system")
                }
            };
            variant += 1;
            env.lab.write_config(&config_variant(&env.lab, variant, "")).unwrap();
            env.agent().send(Control::Reload).await;
            let requests = before.config.reload_requests;
            let s = env
                .wait_status(Duration::from_secs(15), "the reload request handled", move |s| {
                    s.config.reload_requests > requests
                })
                .await;
            let what = format!("{dir} {fault:?}");
            let last = s.config.last_reload.clone().expect("a reload record");
            let message = last.message.clone().unwrap_or_default();
            assert_eq!(last.result, "failed", "{what}: {last:?}");
            assert_eq!(s.config.pending_error.as_deref(), Some(message.as_str()), "{what}");
            assert!(message.contains(cause), "{what}: the error names the cause: {message}");
            assert!(
                message.contains(&m.dir.display().to_string()),
                "{what}: the error names the path: {message}"
            );
            let metrics = http_get(env.agent().metrics_addr(), "/metrics").await.1;
            assert_eq!(
                metric(&metrics, "apilb_haproxy_reloads_total{result=\"failed\"}"),
                Some(failed_before + 1.0),
                "{what}"
            );
            // HAProxy keeps the last good config: same processes, same file.
            assert_eq!(s.config.hash, before.config.hash, "{what}");
            let now = show_proc(&env.lab).await.unwrap();
            assert_eq!(now.master_pid, proc.master_pid, "{what}");
            assert_eq!(now.workers, proc.workers, "{what}: the worker changed");
            assert_eq!(now.reloads, proc.reloads, "{what}: HAProxy was reloaded");
            assert_eq!(
                std::fs::read(layout(&env.lab).config_file()).unwrap(),
                cfg,
                "{what}: haproxy.cfg changed"
            );
            assert_eq!(held.served_by().await.unwrap(), held_by, "{what}: the held connection");
            assert!(served_by(&env).await.is_ok(), "{what}: a new connection");

            // Space comes back: the same change applies.
            match filler {
                Some(f) => std::fs::remove_file(f).unwrap(),
                None => m.set_read_only(false).unwrap(),
            }
            let fixed = Instant::now();
            env.agent().send(Control::Reload).await;
            let old = before.config.hash.clone();
            let s = env
                .wait_status(Duration::from_secs(15), "the change applied", move |s| {
                    s.config.hash != old
                        && s.config.last_reload.as_ref().is_some_and(|r| r.result == "success")
                })
                .await;
            assert!(s.config.pending_error.is_none(), "{what}: {s:#?}");
            let applied = std::fs::read_to_string(layout(&env.lab).config_file())
                .unwrap()
                .contains(&variant_line(variant));
            assert!(applied, "{what}: the new haproxy.cfg is in place");
            lines.push(format!(
                "{what}: refused with \"{message}\"; applied {:.0?} after the fix",
                fixed.elapsed()
            ));
        }
    }
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "new connections failed: {:?}", report.errors);
    assert_eq!(held.served_by().await.unwrap(), held_by);
    for l in &lines {
        measured("disk", l);
    }
    measured(
        "disk",
        &format!("new connections meanwhile: {} ok, 0 failed; the held one kept working", report.ok),
    );
}
