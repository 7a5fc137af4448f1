//! Garbage, truncated and empty content in each state file apilb (or its
//! HAProxy) reads at start or reload: the saved master set (masters.json),
//! HAProxy's server-state file and the pidfile. The agent starts or adopts
//! and serves, and a warning names the file.

use std::path::Path;
use std::time::Duration;

use apilb_testkit::lab::{ClusterKind, LabOptions};
use apilb_testkit::testapi::Session;
use nix::sys::signal::Signal;

use crate::common::*;
use crate::support::*;

/// How a file is damaged.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Bytes that mean nothing, not even UTF-8.
    Garbage,
    /// The first half of the real content, cut inside a line (a write
    /// interrupted by a crash, without apilb's atomic rename).
    Truncated,
    /// Zero bytes.
    Empty,
}

const DAMAGES: [Damage; 3] = [Damage::Garbage, Damage::Truncated, Damage::Empty];

fn damage(path: &Path, how: Damage) {
    let valid = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = match how {
        Damage::Garbage => b"\x00\xff\xfe garbage {{[[ \x7f\x1b\n\xc3\x28 \x00 ]]\n".to_vec(),
        Damage::Truncated => {
            let body = valid.trim_ascii_end();
            let mut cut = body.len().div_ceil(2);
            // Inside a line, not at its end.
            while cut > 1 && body[cut - 1] == b'\n' {
                cut -= 1;
            }
            assert!(cut > 0 && cut < body.len(), "{}: nothing to truncate", path.display());
            valid[..cut].to_vec()
        }
        Damage::Empty => Vec::new(),
    };
    std::fs::write(path, content).unwrap();
}

fn spawn(env: &Env, name: &str) -> AgentProcess {
    AgentProcess::spawn(&env.lab, name, &[])
}

/// Kills the agent with SIGKILL: HAProxy keeps running, as after a crash.
fn crash(agent: &mut AgentProcess) {
    agent.signal(Signal::SIGKILL);
    agent.wait_exit(Duration::from_secs(5)).expect("apilb died");
}

/// Stops the agent and its HAProxy gracefully (SIGTERM).
fn stop(agent: &mut AgentProcess) {
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15)).expect("apilb stopped");
    assert!(status.success(), "{}", agent.logs());
}

/// The message of a log line (after the level and the target).
fn message(line: &str) -> &str {
    let rest = ["WARN ", "ERROR "].iter().find_map(|l| line.split_once(l).map(|(_, r)| r)).unwrap_or(line);
    rest.split_once(": ").map(|(_, m)| m).unwrap_or(rest).trim()
}

/// Lines of the agent's log that mention `file` at WARN or above.
fn warnings_about(agent: &AgentProcess, file: &Path) -> Vec<String> {
    let name = file.display().to_string();
    agent
        .logs()
        .lines()
        .filter(|l| l.contains(&name) && (l.contains("WARN") || l.contains("ERROR")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_saved_master_set_is_ignored_with_a_warning() {
    let _serial = exclusive().await;
    let mut reaper = Reaper::default();
    let env =
        Env::new(LabOptions { cluster: Some(ClusterKind::EndpointSlices), ..LabOptions::default() }).await;
    reaper.watch(&env.lab);
    env.lab.write_config(&env.lab.config_yaml(&env.lab.discovery_yaml(""))).unwrap();
    let file = layout(&env.lab).masters_file();
    let discovered = |s: &apilb::status::Status| {
        s.discovery.as_ref().is_some_and(|d| d.last_success.is_some())
            && s.in_rotation().count() == 3
            && s.in_rotation().all(|m| m.source == "discovered")
    };
    let mut agent = spawn(&env, "agent-0");
    agent.wait_ready(&env.lab).await;
    wait_remote_status(&env.lab, Duration::from_secs(15), "discovery applied", discovered).await;
    let master = env.haproxy_pid().unwrap();
    let tls = env.lab.client_tls().unwrap();
    let mut held = Session::connect(env.lab.listen, tls, Some(&env.lab.token)).await.unwrap();
    let held_by = held.served_by().await.unwrap();

    let mut lines = Vec::new();
    for how in DAMAGES {
        crash(&mut agent);
        assert!(
            apilb::discovery::persist::load(&file).is_ok_and(|m| m.len() == 3),
            "a valid saved set first"
        );
        damage(&file, how);
        agent = spawn(&env, &format!("agent-{how:?}"));
        agent.wait_ready(&env.lab).await;
        let s = wait_remote_status(&env.lab, Duration::from_secs(15), "discovery applied again", discovered)
            .await;
        assert!(s.haproxy.adopted && s.haproxy.master_pid == Some(master), "{how:?}: not adopted: {s:#?}");
        assert!(served_by(&env).await.is_ok(), "{how:?}");
        assert_eq!(held.served_by().await.unwrap(), held_by, "{how:?}: the held connection");
        let warnings = warnings_about(&agent, &file);
        assert!(
            warnings.iter().any(|l| l.contains("ignoring it")),
            "{how:?}: no warning naming {}:\n{}",
            file.display(),
            agent.logs()
        );
        // The agent writes a good one again once discovery has answered.
        eventually(Duration::from_secs(10), "masters.json rewritten", || async {
            apilb::discovery::persist::load(&file).is_ok_and(|m| m.len() == 3)
        })
        .await;
        lines.push(format!("{how:?}: adopted, serving; {}", message(&warnings[0])));
    }
    for l in lines {
        measured("state files: masters.json", &l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_server_state_file_is_ignored_with_a_warning() {
    let _serial = exclusive().await;
    let mut reaper = Reaper::default();
    let env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    let file = layout(&env.lab).server_state_file();
    let mut agent = spawn(&env, "agent-0");
    agent.wait_ready(&env.lab).await;
    // A reload saves the real server state.
    env.lab.write_config(&config_variant(&env.lab, 0, "")).unwrap();
    agent.signal(Signal::SIGHUP);
    wait_remote_status(&env.lab, Duration::from_secs(15), "reload applied", |s| {
        s.config.reload_requests == 1 && s.config.pending_error.is_none()
    })
    .await;

    let mut lines = Vec::new();
    for (i, how) in DAMAGES.into_iter().enumerate() {
        stop(&mut agent);
        let saved = std::fs::read_to_string(&file).unwrap();
        assert!(saved.starts_with("1\n") && saved.contains("master-1"), "a real server state first: {saved}");
        damage(&file, how);
        let damaged = std::fs::read_to_string(&file).unwrap_or_default();
        // HAProxy reads it when it starts…
        agent = spawn(&env, &format!("agent-{how:?}"));
        agent.wait_ready(&env.lab).await;
        wait_remote_status(&env.lab, Duration::from_secs(15), "every master UP", all_up(3)).await;
        assert!(served_by(&env).await.is_ok(), "{how:?}");
        let warnings = warnings_about(&agent, &file);
        assert!(
            !warnings.is_empty(),
            "{how:?}: no warning naming {}:\n{}\n{:?}",
            file.display(),
            agent.logs(),
            damaged
        );
        // …and a reload writes a good one again.
        env.lab.write_config(&config_variant(&env.lab, i + 1, "")).unwrap();
        agent.signal(Signal::SIGHUP);
        let s = wait_remote_status(&env.lab, Duration::from_secs(15), "reload applied", |s| {
            s.config.reload_requests == 1
        })
        .await;
        assert_eq!(
            s.config.last_reload.as_ref().map(|r| r.result.as_str()),
            Some("success"),
            "{how:?}: {s:#?}"
        );
        let saved = std::fs::read_to_string(&file).unwrap();
        assert!(saved.starts_with("1\n") && saved.contains("master-3"), "{how:?}: {saved}");
        lines.push(format!("{how:?}: started, serving, reloaded; {}", message(&warnings[0])));
    }
    for l in lines {
        measured("state files: servers.state", &l);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_pidfile_does_not_stop_adoption_or_start() {
    let _serial = exclusive().await;
    let mut reaper = Reaper::default();
    let env = Env::new(LabOptions::default()).await;
    reaper.watch(&env.lab);
    let file = layout(&env.lab).pidfile();
    let mut agent = spawn(&env, "agent-0");
    agent.wait_ready(&env.lab).await;
    let master = env.haproxy_pid().unwrap();
    let tls = env.lab.client_tls().unwrap();
    let mut held = Session::connect(env.lab.listen, tls, Some(&env.lab.token)).await.unwrap();
    let held_by = held.served_by().await.unwrap();

    let mut lines = Vec::new();
    // 1. The agent crashed and the pidfile is damaged: the next agent must
    //    adopt the running master (a second HAProxy could not bind).
    for how in DAMAGES {
        crash(&mut agent);
        damage(&file, how);
        agent = spawn(&env, &format!("agent-adopt-{how:?}"));
        agent.wait_ready(&env.lab).await;
        let s = apilb::status_client::fetch(env.lab.metrics).await.unwrap();
        assert!(
            s.haproxy.adopted && s.haproxy.master_pid == Some(master),
            "{how:?}: {s:#?}\n{}",
            agent.logs()
        );
        assert_eq!(show_proc(&env.lab).await.unwrap().master_pid, master);
        assert_eq!(env.haproxy_pid(), Some(master), "{how:?}: the pidfile is rewritten");
        assert_eq!(held.served_by().await.unwrap(), held_by, "{how:?}: the held connection");
        let warnings = warnings_about(&agent, &file);
        assert!(!warnings.is_empty(), "{how:?}: no warning naming {}:\n{}", file.display(), agent.logs());
        lines.push(format!("{how:?}, adoption: adopted master {master}; {}", message(&warnings[0])));
    }
    // 2. Nothing runs and a damaged pidfile was left behind: a fresh start.
    for how in DAMAGES {
        stop(&mut agent);
        std::fs::write(&file, format!("{master}\n")).unwrap();
        damage(&file, how);
        agent = spawn(&env, &format!("agent-start-{how:?}"));
        agent.wait_ready(&env.lab).await;
        let s = apilb::status_client::fetch(env.lab.metrics).await.unwrap();
        assert!(!s.haproxy.adopted, "{how:?}: {s:#?}");
        let pid = env.haproxy_pid().expect("a pidfile");
        assert_eq!(show_proc(&env.lab).await.unwrap().master_pid, pid, "{how:?}");
        assert!(served_by(&env).await.is_ok(), "{how:?}");
        let warnings = warnings_about(&agent, &file);
        assert!(!warnings.is_empty(), "{how:?}: no warning naming {}:\n{}", file.display(), agent.logs());
        lines.push(format!("{how:?}, start: started master {pid}; {}", message(&warnings[0])));
    }
    for l in lines {
        measured("state files: haproxy.pid", &l);
    }
}
