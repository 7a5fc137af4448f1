//! How an external checker's verdict reaches HAProxy (issue 15): the
//! experiments behind the choice of the runtime API (`set server … health
//! down|up`) with HAProxy's own check kept as a slow backstop, over
//! `agent-check`. Each test starts the real `haproxy` on PATH (put
//! scripts/haproxy-from-debian's directory first to try another version)
//! with a hand-written config over the lab's real-TLS test servers, prints
//! what it measured (`RESULT …`, see `--nocapture`) and asserts the
//! properties the design relies on. docs/health-checks.md records the
//! results per version.
//!
//! Timings are shortened (backstop `inter 3s`) so the file runs in about a
//! minute; the mechanisms do not depend on the values. The server lines
//! carry apilb's options (`on-marked-down shutdown-sessions`, `observe
//! layer4 … on-error fastinter`, `option redispatch 1`, `retries`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apilb::haproxy::{cli, stat};
use apilb_testkit::lab::{Lab, LabOptions};
use apilb_testkit::testapi::Session;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// The backstop's timings in these experiments.
const INTER: &str = "3s";
const FASTINTER: &str = "500ms";
const DOWNINTER: &str = "1s";

/// A real HAProxy (master-worker) over a lab's servers `m1` and `m2`.
struct Hap {
    lab: Lab,
    child: Child,
    sock: PathBuf,
    master_sock: PathBuf,
    cfg: PathBuf,
}

impl Drop for Hap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn path_env() -> String {
    format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default())
}

/// The HAProxy version on PATH, for the results.
fn version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .env("PATH", path_env())
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.to_owned()))
        .unwrap_or_default()
}

impl Hap {
    /// `agent` adds `agent-check` towards that port to m1.
    async fn start(agent: Option<u16>) -> Hap {
        Hap::start_with(agent, &format!("inter {INTER} fastinter {FASTINTER} downinter {DOWNINTER}")).await
    }

    /// With the backstop's `timing` (inter, fastinter, downinter).
    async fn start_with(agent: Option<u16>, timing: &str) -> Hap {
        let lab = Lab::start(LabOptions { masters: 2, ..LabOptions::default() }).await.expect("lab");
        let d = lab.dir.path().to_owned();
        std::fs::write(d.join("bundle.pem"), format!("{}{}", lab.node_cert.cert_pem, lab.node_cert.key_pem))
            .expect("bundle");
        let sock = d.join("hap.sock");
        let params = format!(
            "check check-ssl verify required ca-file {d}/ca.crt check-sni kubernetes crt {d}/bundle.pem \
             {timing} rise 2 fall 2 on-marked-down shutdown-sessions observe layer4 error-limit 10 \
             on-error fastinter",
            d = d.display()
        );
        let agent_params = |name: &str| match agent {
            Some(port) => format!(
                " agent-check agent-addr 127.0.0.1 agent-port {port} agent-inter 500ms agent-send \"{name}\\n\""
            ),
            None => String::new(),
        };
        let cfg = format!(
            "global\n    stats socket {sock} mode 600 level admin\n    server-state-file {state}\n\
             defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n    \
             timeout check 1s\n    load-server-state-from-file global\n\
             frontend f\n    bind {listen}\n    default_backend masters\n\
             backend masters\n    balance roundrobin\n    option redispatch 1\n    retries 3\n    \
             option httpchk\n    \
             http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host kubernetes\n    \
             http-check expect status 200\n\
             \x20   server m1 {a1} {params}{ag1}\n    server m2 {a2} {params}\n",
            sock = sock.display(),
            state = d.join("servers.state").display(),
            listen = lab.listen,
            a1 = lab.servers[0].addr(),
            a2 = lab.servers[1].addr(),
            ag1 = agent_params("m1"),
        );
        let cfg_path = d.join("hap.cfg");
        std::fs::write(&cfg_path, cfg).expect("cfg");
        let master_sock = d.join("master.sock");
        let child = Command::new("haproxy")
            .arg("-W")
            .arg("-S")
            .arg(&master_sock)
            .arg("-f")
            .arg(&cfg_path)
            .env("PATH", path_env())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy");
        let hap = Hap { lab, child, sock, master_sock, cfg: cfg_path };
        hap.wait(Duration::from_secs(10), "both UP", |s| s.iter().all(|s| s.status == "UP") && s.len() == 2)
            .await;
        hap
    }

    async fn cmd(&self, c: &str) -> String {
        cli::command(&self.sock, c, Duration::from_secs(2)).await.unwrap_or_else(|e| panic!("{c}: {e}"))
    }

    async fn servers(&self) -> Vec<stat::ServerStat> {
        match cli::command(&self.sock, "show stat", Duration::from_secs(2)).await {
            Ok(t) => stat::parse_show_stat(&t).map(|s| s.servers).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    async fn status(&self, name: &str) -> String {
        self.servers().await.into_iter().find(|s| s.name == name).map(|s| s.status).unwrap_or_default()
    }

    /// Polls every 5 ms until `pred`; returns how long it took.
    async fn wait(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&[stat::ServerStat]) -> bool,
    ) -> Duration {
        let t = Instant::now();
        loop {
            let s = self.servers().await;
            if pred(&s) {
                return t.elapsed();
            }
            let names: Vec<String> = s.iter().map(|s| format!("{}={}", s.name, s.status)).collect();
            assert!(t.elapsed() < limit, "{what}: not within {limit:?}: {names:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_status(&self, name: &str, want: &str, limit: Duration) -> Duration {
        self.wait(limit, &format!("{name} {want}"), |s| {
            s.iter().any(|s| s.name == name && s.status.starts_with(want))
        })
        .await
    }

    /// A session through the frontend that landed on `server` (a lab
    /// server's name, e.g. master-1).
    async fn session_on(&self, server: &str) -> Session {
        let mut others = Vec::new();
        for _ in 0..40 {
            let mut s =
                Session::connect(self.lab.listen, self.lab.client_tls().expect("tls"), Some(&self.lab.token))
                    .await
                    .expect("session");
            if s.served_by().await.expect("served") == server {
                return s;
            }
            others.push(s);
        }
        panic!("no session landed on {server}");
    }

    /// Saves the server state and reloads (SIGUSR2 to the master), as
    /// apilb does; waits for the new worker's stats socket.
    async fn reload(&self) {
        let state = self.cmd("show servers state").await;
        std::fs::write(self.lab.dir.path().join("servers.state"), state).expect("state");
        let old = self.cmd("show info").await;
        let pid_of = |info: &str| info.lines().find(|l| l.starts_with("Pid:")).map(str::to_owned);
        let old_pid = pid_of(&old);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .expect("SIGUSR2");
        let t = Instant::now();
        loop {
            if let Ok(info) = cli::command(&self.sock, "show info", Duration::from_secs(1)).await
                && pid_of(&info) != old_pid
            {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no new worker");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = (&self.master_sock, &self.cfg);
    }
}

#[tokio::test]
async fn runtime_health_down_is_immediate_closes_sessions_and_the_backstop_undoes_it() {
    let hap = Hap::start(None).await;
    let mut session = hap.session_on("master-1").await;
    let t = Instant::now();
    let reply = hap.cmd("set server masters/m1 health down").await;
    let answered = t.elapsed();
    let status_after = hap.status("m1").await;
    let down = hap.wait_status("m1", "DOWN", Duration::from_secs(2)).await;
    let closed = session.wait_closed(Duration::from_secs(2)).await;
    let closed_after = t.elapsed();
    println!(
        "RESULT {}: `set server health down`: reply {reply:?} in {answered:?}; status read right after: \
         {status_after}; DOWN seen after {down:?}; session on it closed: {closed} ({closed_after:?})",
        version()
    );
    assert!(status_after.starts_with("DOWN"), "the mark-down is synchronous: {status_after}");
    assert!(closed, "on-marked-down shutdown-sessions fires for a runtime mark-down");
    // No agent to say "up" again (it died right after marking down): the
    // master is healthy, so HAProxy's own check brings it back.
    let up = hap.wait_status("m1", "UP", Duration::from_secs(10)).await;
    println!(
        "RESULT {}: healthy master marked down by the runtime API: UP again by the backstop after {up:?}",
        version()
    );
    // rise 2 checks at downinter.
    assert!(up < Duration::from_secs(4), "{up:?}");
    // And `health up` is immediate too.
    hap.lab.servers[0].set_readyz(503);
    hap.wait_status("m1", "DOWN", Duration::from_secs(8)).await;
    let t = Instant::now();
    hap.cmd("set server masters/m1 health up").await;
    let after = hap.status("m1").await;
    println!(
        "RESULT {}: `set server health up` on a master failing its backstop check: {after} at once; \
         then DOWN again after {:?}",
        version(),
        {
            hap.wait_status("m1", "DOWN", Duration::from_secs(10)).await;
            t.elapsed()
        }
    );
    assert!(after.starts_with("UP"), "{after}");
}

#[tokio::test]
async fn with_no_agent_the_backstop_takes_a_failing_master_out_and_back() {
    // The agent SIGKILLed and not restarted is, for HAProxy, no runtime
    // commands at all: only its own checks run.
    let hap = Hap::start(None).await;
    hap.lab.servers[0].set_readyz(503);
    let down = hap.wait_status("m1", "DOWN", Duration::from_secs(10)).await;
    hap.lab.servers[0].set_readyz(200);
    let up = hap.wait_status("m1", "UP", Duration::from_secs(10)).await;
    hap.lab.servers[0].hang();
    let hung = hap.wait_status("m1", "DOWN", Duration::from_secs(15)).await;
    hap.lab.servers[0].resume();
    let resumed = hap.wait_status("m1", "UP", Duration::from_secs(10)).await;
    println!(
        "RESULT {}: backstop alone (inter {INTER}, fastinter {FASTINTER}, downinter {DOWNINTER}, fall 2, rise 2): \
         503 DOWN after {down:?}, UP again {up:?} after recovery; hang DOWN after {hung:?}, UP {resumed:?} after resume",
        version()
    );
}

#[tokio::test]
async fn a_runtime_mark_down_survives_a_reload() {
    let hap = Hap::start(None).await;
    // A master the agent found failing: failing for the backstop as well,
    // slowly (the backstop has not noticed yet).
    hap.lab.servers[0].set_readyz(503);
    hap.cmd("set server masters/m1 health down").await;
    hap.reload().await;
    let after = hap.status("m1").await;
    println!("RESULT {}: runtime mark-down, state saved, reload: m1 is {after} in the new worker", version());
    assert!(after.starts_with("DOWN"), "{after}");
    // And a master the agent marked up stays up across a reload.
    hap.lab.servers[0].set_readyz(200);
    hap.cmd("set server masters/m1 health up").await;
    hap.reload().await;
    let after = hap.status("m1").await;
    assert!(after.starts_with("UP"), "{after}");
}

/// A one-line agent for `agent-check`: answers `reply` to each poll.
async fn agent(reply: &'static str) -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(reply.as_bytes()).await;
        }
    });
    (port, task)
}

#[tokio::test]
async fn agent_check_down_outlives_the_agent() {
    // The alternative: HAProxy polls the agent. Port fixed up front so the
    // agent can come and go on it.
    let (port, up_agent) = agent("up\n").await;
    let hap = Hap::start(Some(port)).await;
    let mut session = hap.session_on("master-1").await;
    up_agent.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let l = TcpListener::bind(("127.0.0.1", port)).await.expect("rebind");
    let down_agent = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"down\n").await;
        }
    });
    let down = hap.wait_status("m1", "DOWN", Duration::from_secs(3)).await;
    let closed = session.wait_closed(Duration::from_secs(2)).await;
    // The agent dies (port refused); the master is healthy all along.
    down_agent.abort();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = hap.status("m1").await;
    println!(
        "RESULT {}: agent-check (agent-inter 500ms): agent says down -> DOWN after {down:?}; session closed: {closed}; agent dead 6s, master healthy, backstop passing: m1 is {after}",
        version(),
    );
    assert!(closed, "shutdown-sessions fires for an agent mark-down");
    assert!(after.starts_with("DOWN"), "the agent's down outlives the agent: {after}");
}

#[tokio::test]
async fn kept_connection_checker_plus_runtime_api_at_one_second() {
    // The proposed design end to end, at the timings: the checker
    // (interval 1s, timeout 1s, fall 1, rise 2) on m1, its verdict changes
    // pushed with `set server … health`, HAProxy's own check as a backstop
    // every 10 s.
    use apilb::check::{Checker, Settings, Target, client_config, push};
    let hap = Hap::start_with(None, "inter 10s fastinter 1s downinter 10s").await;
    let (config, inputs) = apilb::load_parts(&hap.lab.config_path()).expect("config");
    let settings = Settings { fall: 1, rise: 2, ..Settings::from_config(&config, &inputs) };
    let target = Target { name: "m1".into(), address: hap.lab.servers[0].addr().to_string() };
    let checker = Checker::spawn(target, std::sync::Arc::new(settings), client_config(&inputs).expect("tls"))
        .expect("checker");
    let mut rx = checker.watch();
    let sock = hap.sock.clone();
    let pusher = tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let verdict = rx.borrow_and_update().verdict.clone();
            if let Err(e) = push::apply(&sock, "masters", "m1", &verdict).await {
                eprintln!("push: {e}");
            }
        }
    });
    let mut up = checker.watch();
    let _ = tokio::time::timeout(Duration::from_secs(5), up.wait_for(|r| r.verdict.is_up())).await;
    let server = &hap.lab.servers[0];
    let mut rows = Vec::new();
    for (what, fail, heal) in [("readyz 503", 0, 0), ("hang", 1, 1), ("crash", 2, 2)] {
        // Start at a random point of the check cycle.
        tokio::time::sleep(Duration::from_millis(1000 + 137 * what.len() as u64 % 1000)).await;
        let mut session = hap.session_on("master-1").await;
        match fail {
            0 => server.set_readyz(503),
            1 => server.hang(),
            _ => server.crash(),
        }
        let down = hap.wait_status("m1", "DOWN", Duration::from_secs(5)).await;
        let closed = session.wait_closed(Duration::from_secs(1)).await;
        match heal {
            0 => server.set_readyz(200),
            1 => server.resume(),
            _ => server.restart().await.expect("restart"),
        }
        let back = hap.wait_status("m1", "UP", Duration::from_secs(5)).await;
        rows.push(format!(
            "{what}: DOWN after {down:.2?} (session closed: {closed}), UP {back:.2?} after recovery"
        ));
        let limit = if fail == 1 { Duration::from_millis(2200) } else { Duration::from_millis(1500) };
        assert!(down <= limit, "{what}: {down:?}");
    }
    println!(
        "RESULT {}: checker 1s/1s fall 1 rise 2 + runtime API, backstop inter 10s: {}",
        version(),
        rows.join("; ")
    );
    let r = checker.report();
    println!(
        "RESULT checker: {} checks, {} TLS handshakes, {} connection attempts",
        r.checks, r.handshakes, r.connects
    );
    pusher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_pushed_down_at_once_under_connection_load() {
    // The open question of the crash case: the checker sees a crash within
    // milliseconds (its kept connection closes) and pushes DOWN, so
    // `shutdown-sessions` fires while HAProxy is still redispatching the
    // connections that were refused. Counts the connections opened after
    // the crash that failed anyway (measured, not asserted: about one in
    // ten crashes at this rate, like HAProxy's own check; see
    // docs/health-checks.md).
    use apilb::check::{Checker, Settings, Target, client_config, push};
    use apilb_testkit::testapi::Load;
    let mut rows = Vec::new();
    let (mut opened_after, mut failed_after, mut cut_at_crash) = (0u64, 0usize, 0usize);
    for round in 0..5 {
        let hap = Hap::start_with(None, "inter 10s fastinter 1s downinter 10s").await;
        let (config, inputs) = apilb::load_parts(&hap.lab.config_path()).expect("config");
        let settings = Settings { fall: 1, rise: 2, ..Settings::from_config(&config, &inputs) };
        let target = Target { name: "m2".into(), address: hap.lab.servers[1].addr().to_string() };
        let checker =
            Checker::spawn(target, std::sync::Arc::new(settings), client_config(&inputs).expect("tls"))
                .expect("checker");
        let mut rx = checker.watch();
        let sock = hap.sock.clone();
        let pushed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let pushed_at = pushed.clone();
        let pusher = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let verdict = rx.borrow_and_update().verdict.clone();
                if verdict.is_down() {
                    *pushed_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
                }
                let _ = push::apply(&sock, "masters", "m2", &verdict).await;
            }
        });
        let mut up = checker.watch();
        let _ = tokio::time::timeout(Duration::from_secs(5), up.wait_for(|r| r.verdict.is_up())).await;
        let clients =
            Load::start(hap.lab.listen, hap.lab.client_tls().expect("tls"), Some(hap.lab.token.clone()), 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        hap.lab.servers[1].crash();
        let crashed = std::time::Instant::now();
        hap.wait_status("m2", "DOWN", Duration::from_secs(3)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let report = clients.stop().await;
        let after = report.failed_since(crashed);
        let cut = report.cut_at(crashed).len();
        let ok_after: u64 = report.ok_since(crashed).values().sum();
        let push = pushed.lock().unwrap_or_else(|e| e.into_inner()).map(|t| t.duration_since(crashed));
        rows.push(format!(
            "round {}: pushed DOWN {push:.2?} after the crash; {} opened after it, {} of them failed ({:?}); {cut} cut in flight",
            round + 1,
            ok_after + after.len() as u64,
            after.len(),
            after.iter().map(|f| f.error.clone()).collect::<Vec<_>>()
        ));
        opened_after += ok_after + after.len() as u64;
        failed_after += after.len();
        cut_at_crash += cut;
        pusher.abort();
    }
    println!(
        "RESULT {}: crash under load (4 clients, a new connection per request), checker fall 1 pushing at once: \
         {failed_after} of {opened_after} connections opened after the crash failed, {cut_at_crash} cut in flight; {}",
        version(),
        rows.join("; ")
    );
}
