//! The `apilb` binary as users run it: status, JSON logs, systemd
//! readiness, the unit file, render/check exit codes.

mod support;

use std::process::Command;
use std::time::Duration;

use apilb_testkit::lab::LabOptions;
use support::*;

fn apilb() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_apilb"));
    c.env("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()));
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_true_picture_and_json() {
    let mut env = Env::new(LabOptions::default()).await;
    env.start_agent().await;
    env.wait_all_up().await;
    env.lab.servers[2].set_readyz(503);
    env.wait_status(Duration::from_secs(10), "master-3 DOWN", |s| s.masters[2].state == "DOWN").await;

    let config = env.lab.config_path();
    let out = tokio::task::spawn_blocking(move || {
        apilb().arg("status").arg("--config").arg(&config).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("2/3 masters up"), "{text}");
    assert!(text.contains("MASTER") && text.contains("LAST CHECK") && text.contains("SESSIONS"), "{text}");
    let line3 = text.lines().find(|l| l.starts_with("master-3")).expect("master-3 row");
    assert!(line3.contains("DOWN") && line3.contains("L7STS 503"), "{line3}");
    assert!(text.contains("Check: client_cert credential"), "{text}");
    assert!(text.contains(&format!("master {}", env.haproxy_pid().unwrap())), "{text}");

    let config = env.lab.config_path();
    let out = tokio::task::spawn_blocking(move || {
        apilb().args(["status", "--json", "--config"]).arg(&config).output().unwrap()
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["masters"][2]["state"], "DOWN");
    assert_eq!(json["masters"][2]["check_code"], 503);
    assert_eq!(json["haproxy"]["running"], true);
}

#[test]
fn status_without_an_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let port = apilb_testkit::lab::free_port(None).unwrap();
    let cfg = dir.path().join("apilb.yaml");
    std::fs::write(&cfg, format!("masters: [10.0.0.1:6443]\nmetrics: {{listen: \"127.0.0.1:{port}\"}}\n"))
        .unwrap();
    let out = apilb().arg("status").arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("no apilb agent is answering on 127.0.0.1:{port}")), "{err}");
}

#[test]
fn config_errors_exit_2_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "masters:\n  - 10.0.0.1:6443\n  - 10.0.0.2:6443\n  - 10.0.0.3\n",
            "masters[2]: \"10.0.0.3\" has no port",
        ),
        ("masters: [10.0.0.1:6443]\nbalance: fastest\n", "balance: unknown variant `fastest`"),
        ("masters: [10.0.0.1:6443]\nhealth:\n  timeout: 5\n", "health.timeout: 5 needs a unit"),
        (
            "masters: [10.0.0.1:6443]\nhealth:\n  auth: {mode: none}\n  tls: {ca_file: /nonexistent/ca.crt}\n",
            "health.tls.ca_file: /nonexistent/ca.crt: no such file",
        ),
        ("masters: [10.0.0.1:6443, 10.0.0.1:6443]\n", "masters[1]: 10.0.0.1:6443 is listed twice"),
    ];
    for (yaml, want) in cases {
        let cfg = dir.path().join("apilb.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        for cmd in ["check", "render", "run"] {
            let out = apilb().arg(cmd).arg("--config").arg(&cfg).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} on {yaml:?}: {err}");
            let last = err.lines().last().unwrap_or_default();
            assert!(last.contains(want), "{cmd}: {err:?} does not contain {want:?}");
            assert_eq!(err.lines().filter(|l| l.starts_with("apilb: ")).count(), 1, "{err}");
        }
    }
}

#[test]
fn render_redacts_secrets_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cr3t-t0ken-value\n").unwrap();
    let cfg = dir.path().join("apilb.yaml");
    std::fs::write(
        &cfg,
        format!(
            "masters: [10.0.0.1:6443]\nhealth:\n  tls: {{insecure_skip_verify: true}}\n  auth: {{mode: bearer, token_file: {}/token}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = apilb().arg("render").arg("--config").arg(&cfg).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!text.contains("s3cr3t-t0ken-value") && text.contains("'Bearer <redacted>'"), "{text}");
    let out = apilb().args(["render", "--show-secrets", "--config"]).arg(&cfg).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("'Bearer s3cr3t-t0ken-value'"));
    let file = dir.path().join("out.cfg");
    let out = apilb().args(["render", "--config"]).arg(&cfg).arg("-o").arg(&file).output().unwrap();
    assert!(out.status.success());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_systemd_readiness() {
    use std::os::unix::net::UnixDatagram;
    let env = Env::new(LabOptions::default()).await;
    let notify_path = env.lab.path("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let notify_env = notify_path.display().to_string();
    let mut agent = AgentProcess::spawn_with(
        &env.lab,
        "notify",
        &[("NOTIFY_SOCKET", &notify_env)],
        &["--log-format", "json"],
    );
    let listen = env.lab.listen;
    let messages = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = notify.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("READY=1") {
                // READY=1 comes only once the frontend accepts connections.
                assert!(std::net::TcpStream::connect(listen).is_ok(), "READY=1 before the frontend accepts");
            }
            got.push(msg);
            if got.iter().any(|m| m.contains("READY=1")) && got.iter().any(|m| m == "STATUS=3/3 masters up") {
                break;
            }
        }
        got
    })
    .await
    .unwrap();
    assert!(messages.iter().any(|m| m == "READY=1"), "{messages:?}");
    assert!(messages.iter().any(|m| m == "STATUS=3/3 masters up"), "{messages:?}");
    // HAProxy does not inherit the notify socket.
    let pid = env.haproxy_pid().unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"));

    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = agent.wait_exit(Duration::from_secs(10));
    let logs = agent.logs();
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}\n{logs}");
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 3, "{logs}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("message").is_some(), "{l}");
    }
    assert!(logs.contains("\"target\":\"haproxy\""), "HAProxy's output is in apilb's log");
    assert!(!logs.contains('\u{1b}'), "no terminal colours in logs");
}

#[test]
fn the_unit_file_verifies() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed; skipping unit verification");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/apilb.service")).unwrap();
    let unit = unit.replace("/usr/bin/apilb", env!("CARGO_BIN_EXE_apilb"));
    let path = dir.path().join("apilb.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("apilb.service"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_the_outcome_like_systemctl_reload_should() {
    let env = Env::new(LabOptions::default()).await;
    let mut agent = AgentProcess::spawn(&env.lab, "reload", &[]);
    agent.wait_ready(&env.lab).await;
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = apilb().args(&args).output().unwrap();
            (
                out.status.code(),
                format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
            )
        })
    };
    let config = env.lab.config_path().display().to_string();
    let reload = |cfg: &str| vec!["reload".to_string(), "--config".into(), cfg.to_owned()];

    // A real change: applied, and said so.
    env.lab.write_config(&env.lab.config_yaml("timeouts:\n  connect: 2500ms\n")).unwrap();
    let (code, out) = run(reload(&config)).await.unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("applied: HAProxy runs config sha256:"), "{out}");
    assert!(
        std::fs::read_to_string(layout(&env.lab).config_file()).unwrap().contains("timeout connect 2500ms")
    );

    // A change the agent refuses (the state directory only changes at a
    // restart): fails with the agent's reason, though `apilb check`
    // accepts the file.
    let d = env.lab.dir.path().display().to_string();
    let yaml =
        env.lab.config_yaml("").replace(&format!("state_dir: {d}/state"), &format!("state_dir: {d}/state2"));
    env.lab.write_config(&yaml).unwrap();
    let (code, out) = run(reload(&config)).await.unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("did not apply the change")
            && out.contains("haproxy.state_dir changed")
            && out.contains(apilb::config::restart_only::HANDOVER),
        "{out}"
    );

    // An invalid file: refused before the agent is even signalled.
    env.lab.write_config("masters: []\n").unwrap();
    let (code, out) = run(reload(&config)).await.unwrap();
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("at least one master is required"), "{out}");

    // `apilb status` still finds the agent (through metrics.listen) and
    // shows why the file is not applied.
    let invalid = env.lab.config_yaml("").replace("  rise: 2\n", "  rise: 0\n");
    assert!(invalid.contains("rise: 0"));
    env.lab.write_config(&invalid).unwrap();
    let status = vec!["status".to_string(), "--config".into(), config.clone()];
    let mut shown = String::new();
    for _ in 0..100 {
        let (code, out) = run(status.clone()).await.unwrap();
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("note: ") && out.contains("health.rise: 0 is out of range"), "{out}");
        shown = out;
        if shown.contains("NOT APPLIED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown.contains("NOT APPLIED") && shown.contains("masters up"), "{shown}");

    // `apilb status --address` needs no config at all.
    let (code, out) = run(vec![
        "status".into(),
        "--config".into(),
        "/nonexistent".into(),
        "--address".into(),
        env.lab.metrics.to_string(),
    ])
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("masters up"), "{out}");
}

/// Runs `apilb check` on the lab's config; returns (exit code, stdout + stderr).
fn check(config: &std::path::Path) -> (Option<i32>, String) {
    let out = apilb().arg("check").arg("--config").arg(config).output().unwrap();
    (
        out.status.code(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// `apilb check` prints the hash the agent reports for the same file, and
/// the SHA-256 of `apilb render`'s output (secrets redacted) is that hash:
/// what the Ansible role compares to know apilb runs the file on disk. With
/// a bearer token, the one secret that is inside haproxy.cfg itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_render_give_the_hash_the_agent_reports() {
    use sha2::{Digest, Sha256};
    let mut env =
        Env::new(LabOptions { auth: apilb_testkit::lab::LabAuth::Bearer, ..LabOptions::default() }).await;
    env.start_agent().await;
    let s = env.wait_all_up().await;
    let config = env.lab.config_path();
    let (code, out) = tokio::task::spawn_blocking({
        let config = config.clone();
        move || check(&config)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("config sha256:{}", &s.config.hash[..12])),
        "status {}: {out}",
        s.config.hash
    );
    let render = apilb().arg("render").arg("--config").arg(&config).output().unwrap();
    assert!(render.status.success(), "{}", String::from_utf8_lossy(&render.stderr));
    let text = String::from_utf8_lossy(&render.stdout);
    assert!(text.contains("Authorization"), "no bearer header in the render: {text}");
    let digest: String = Sha256::digest(&render.stdout).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, s.config.hash, "sha256 of apilb render is not the hash in /status");
}

#[test]
fn check_reads_the_discovery_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let base = "masters: [10.0.0.1:6443]\nhealth: {tls: {insecure_skip_verify: true}, auth: {mode: none}}\n";
    let cfg = dir.path().join("apilb.yaml");
    // Not there yet (a node before its join): a note, not a failure.
    let missing = dir.path().join("kubeproxy.kubeconfig");
    let discovery = format!("discovery: {{kubernetes: {{kubeconfig: {}}}}}\n", missing.display());
    std::fs::write(&cfg, format!("{base}{discovery}")).unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "note: discovery.kubernetes.kubeconfig {} does not exist (yet)",
            missing.display()
        )),
        "{out}"
    );
    // There but unusable: a configuration error naming the key.
    std::fs::write(&missing, "apiVersion: v1\nclusters: []\n").unwrap();
    let (code, out) = check(&cfg);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("discovery.kubernetes.kubeconfig:") && out.contains(&missing.display().to_string()),
        "{out}"
    );
}

#[test]
fn check_works_from_a_deleted_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("apilb.yaml");
    std::fs::write(
        &cfg,
        "masters: [10.0.0.1:6443]\nhealth: {tls: {insecure_skip_verify: true}, auth: {mode: none}}\n",
    )
    .unwrap();
    let cwd = dir.path().join("gone");
    std::fs::create_dir(&cwd).unwrap();
    let c = std::ffi::CString::new(cwd.as_os_str().as_encoded_bytes()).unwrap();
    let mut cmd = apilb();
    cmd.arg("check").arg("--config").arg(&cfg);
    // SAFETY: chdir and rmdir are async-signal-safe; the path was
    // allocated before the fork. The child enters the directory, which is
    // then deleted under it, before apilb runs.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::chdir(c.as_ptr()) != 0 || libc::rmdir(c.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(!cwd.exists());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
}

/// True when this process may raise its hard limits (CAP_SYS_RESOURCE).
fn can_raise_limits() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    // Bit 24 is CAP_SYS_RESOURCE (linux/capability.h).
    u64::from_str_radix(eff, 16).unwrap() & (1 << 24) != 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_hard_fd_limit_is_met_or_explained_before_haproxy_starts() {
    // HAProxy needs about 2 × maxconn descriptors (4096 by default) and
    // cannot raise its limit past the hard one: under 1024 it refused to
    // start ("Cannot raise FD limit to 8233, limit is 1024").
    let env = Env::new(LabOptions::default()).await;
    let mut agent = AgentProcess::spawn_with_fd_limit(&env.lab, "fd-limit", 1024);
    if can_raise_limits() {
        agent.wait_ready(&env.lab).await;
        assert!(
            agent.logs().contains("raised the hard file descriptor limit for HAProxy"),
            "{}",
            agent.logs()
        );
        agent.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(agent.wait_exit(Duration::from_secs(10)).is_some_and(|e| e.success()));
    } else {
        // Said up front, naming the setting and what fits; no HAProxy.
        let exit = agent.wait_exit(Duration::from_secs(10));
        let logs = agent.logs();
        assert_eq!(exit.and_then(|e| e.code()), Some(1), "{logs}");
        assert!(
            logs.contains("haproxy.maxconn 4096 needs about")
                && logs.contains("the hard limit here is 1024")
                && logs.contains("set haproxy.maxconn to 474 or less"),
            "{logs}"
        );
        assert!(env.haproxy_pid().is_none(), "HAProxy was started");
    }
    // A maxconn that fits starts under the same limit.
    let yaml = env.lab.config_yaml("  maxconn: 400\n");
    env.lab.write_config(&yaml).unwrap();
    let mut agent = AgentProcess::spawn_with_fd_limit(&env.lab, "fd-limit-400", 1024);
    agent.wait_ready(&env.lab).await;
    assert!(served_by(&env).await.is_ok());
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(10)).is_some_and(|e| e.success()));
}

/// `apilb render` decides whether HAProxy's workers drop to `haproxy.user`
/// as the agent would: from the owner of the runtime directory, not from
/// who runs the command. Run as root for an agent that runs as another
/// user (apilb.service's `apilb`), it renders no `user` line, so its hash
/// is the one that agent reports.
#[test]
fn render_drops_to_haproxy_user_only_for_an_agent_that_runs_as_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cfg = dir.path().join("apilb.yaml");
    std::fs::write(
        &cfg,
        format!(
            "masters: [10.0.0.1:6443]\nhealth: {{tls: {{insecure_skip_verify: true}}, auth: {{mode: none}}}}\n\
             haproxy: {{runtime_dir: {}, state_dir: {}, user: daemon}}\n",
            runtime.display(),
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let render = || {
        let out = apilb().arg("render").arg("--config").arg(&cfg).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let root = nix::unistd::geteuid().is_root();
    // Owned by the caller: root drops the workers, anybody else cannot.
    assert_eq!(render().contains("\n    user daemon\n"), root, "{}", render());
    if root {
        // Owned by another user: that user's agent cannot drop root.
        std::os::unix::fs::chown(&runtime, Some(65534), Some(65534)).unwrap();
        let text = render();
        assert!(!text.contains("\n    user "), "{text}");
    }
}
