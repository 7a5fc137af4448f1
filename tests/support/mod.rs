//! Shared scaffolding of the integration tests: a lab (test API servers,
//! PKI, config) and an in-process agent, torn down on drop, HAProxy
//! included.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use apilb::agent::{self, Control, Exit, Handle};
use apilb::layout::Paths;
use apilb::status::Status;
#[allow(unused_imports)]
pub use apilb_testkit::lab::LabAuth;
use apilb_testkit::lab::{Lab, LabOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The runtime layout of a lab's agent: its config puts the runtime and
/// state directories under the lab directory.
pub fn layout(lab: &Lab) -> Paths {
    Paths::under(lab.dir.path())
}

/// Logs from the agent and HAProxy, shown for failing tests.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APILB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

/// A lab and, once started, its agent. Dropping it kills HAProxy.
pub struct Env {
    pub lab: Lab,
    pub agent: Option<Handle>,
}

impl Env {
    pub async fn new(opts: LabOptions) -> Env {
        init_logs();
        let lab = Lab::start(opts).await.expect("lab");
        Env { lab, agent: None }
    }

    pub async fn start_agent(&mut self) -> &Handle {
        let handle = agent::start(agent::Options {
            config_path: self.lab.config_path(),
            shutdown_grace: Duration::from_secs(1),
        })
        .await
        .unwrap_or_else(|e| panic!("agent start: {e}"));
        self.agent = Some(handle);
        self.agent.as_ref().unwrap()
    }

    pub fn agent(&self) -> &Handle {
        self.agent.as_ref().expect("agent started")
    }

    /// Waits until the status satisfies `pred`, at most `limit`.
    pub async fn wait_status(&self, limit: Duration, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let mut rx = self.agent().status();
        let result = tokio::time::timeout(limit, async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return s.clone();
                    }
                }
                if rx.changed().await.is_err() {
                    panic!("agent exited while waiting for: {what}");
                }
            }
        })
        .await;
        match result {
            Ok(s) => s,
            Err(_) => panic!("timed out after {limit:?} waiting for: {what}\nstatus: {:#?}", rx.borrow()),
        }
    }

    pub async fn wait_all_up(&self) -> Status {
        let n = self.lab.servers.len();
        self.wait_status(Duration::from_secs(15), "every master UP with a passed check", move |s| {
            s.masters.len() == n && s.masters.iter().all(|m| m.state == "UP" && m.check_status == "L7OK")
        })
        .await
    }

    pub async fn stop_agent(&mut self) -> Exit {
        let h = self.agent.take().expect("agent started");
        h.send(Control::Shutdown).await;
        h.wait().await
    }

    pub fn haproxy_pid(&self) -> Option<u32> {
        std::fs::read_to_string(layout(&self.lab).pidfile()).ok()?.trim().parse().ok()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.abort();
        }
        self.lab.kill_haproxy();
    }
}

/// A plain HTTP/1.1 GET; returns status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to metrics endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

#[allow(unused_imports)]
pub use apilb::haproxy::supervisor::alive;

/// Polls `f` every 20 ms until it returns true, at most `limit`; returns
/// how long it took.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        if start.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection through the load balancer that landed on `server`. The
/// attempts that landed elsewhere are held until then, so `leastconn`
/// (which prefers the master with the fewest connections) moves on.
pub async fn session_on(env: &Env, server: &str) -> apilb_testkit::testapi::Session {
    let mut others = Vec::new();
    for _ in 0..60 {
        let mut s = apilb_testkit::testapi::Session::connect(
            env.lab.listen,
            env.lab.client_tls().unwrap(),
            Some(&env.lab.token),
        )
        .await
        .unwrap();
        if s.served_by().await.unwrap() == server {
            return s;
        }
        others.push(s);
    }
    panic!("no connection landed on {server}");
}

/// The backend's servers as HAProxy has them, read from its runtime API.
pub async fn haproxy_servers(env: &Env) -> Vec<apilb::haproxy::stat::ServerStat> {
    let sock = layout(&env.lab).stats_socket();
    match apilb::haproxy::cli::command(&sock, "show stat", Duration::from_secs(2)).await {
        Ok(text) => apilb::haproxy::stat::parse_show_stat(&text).map(|s| s.servers).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// Polls HAProxy every 20 ms until `pred` holds on its servers, at most
/// `limit`; returns when it held.
pub async fn wait_haproxy(
    env: &Env,
    limit: Duration,
    what: &str,
    pred: impl Fn(&[apilb::haproxy::stat::ServerStat]) -> bool,
) -> tokio::time::Instant {
    let start = tokio::time::Instant::now();
    loop {
        let servers = haproxy_servers(env).await;
        if pred(&servers) {
            return tokio::time::Instant::now();
        }
        let names: Vec<String> = servers.iter().map(|s| format!("{}={}", s.name, s.status)).collect();
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}; servers: {names:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which master answers a fresh connection through the load balancer.
pub async fn served_by(env: &Env) -> Result<String, String> {
    let tls = env.lab.client_tls().map_err(|e| e.to_string())?;
    let mut s = apilb_testkit::testapi::Session::connect(env.lab.listen, tls, Some(&env.lab.token)).await?;
    s.served_by().await
}

/// `apilb reload --timeout <timeout> --config <the lab's config>`, as
/// systemd's ExecReload runs it: its exit status and its stdout + stderr.
pub async fn apilb_reload(lab: &Lab, timeout: &str) -> (std::process::ExitStatus, String) {
    let config = lab.config_path();
    let timeout = timeout.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_apilb"))
            .env("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()))
            .args(["reload", "--timeout", &timeout, "--config"])
            .arg(config)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status, text)
}

/// `apilb` as a separate process (for SIGKILL and systemd tests), with its
/// logs in a file of the lab.
pub struct AgentProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl AgentProcess {
    pub fn spawn(lab: &Lab, name: &str, extra_env: &[(&str, &str)]) -> AgentProcess {
        Self::spawn_with(lab, name, extra_env, &[])
    }

    pub fn spawn_with(lab: &Lab, name: &str, extra_env: &[(&str, &str)], args: &[&str]) -> AgentProcess {
        let (mut cmd, log) = Self::command(lab, name, extra_env, args);
        AgentProcess { child: cmd.spawn().expect("spawn apilb"), log }
    }

    /// Like `spawn`, with RLIMIT_NOFILE at `limit` (soft and hard), as an
    /// agent started outside the unit gets on some hosts.
    pub fn spawn_with_fd_limit(lab: &Lab, name: &str, limit: u64) -> AgentProcess {
        let (mut cmd, log) = Self::command(lab, name, &[], &[]);
        // SAFETY: setrlimit is async-signal-safe and allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let l = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        AgentProcess { child: cmd.spawn().expect("spawn apilb"), log }
    }

    fn command(
        lab: &Lab,
        name: &str,
        extra_env: &[(&str, &str)],
        args: &[&str],
    ) -> (std::process::Command, std::path::PathBuf) {
        let log = lab.path(&format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_apilb"));
        cmd.args(args)
            .args(["run", "--shutdown-grace", "1s", "--config"])
            .arg(lab.config_path())
            .env("PATH", format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default()))
            .stdout(std::process::Stdio::null())
            .stderr(file);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        (cmd, log)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits until the agent's /readyz answers 200.
    pub async fn wait_ready(&mut self, lab: &Lab) {
        let addr = lab.metrics;
        let limit = Duration::from_secs(20);
        let start = tokio::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("apilb exited with {status}:\n{}", self.logs());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() && http_get(addr, "/readyz").await.0 == 200
            {
                return;
            }
            if start.elapsed() > limit {
                panic!("apilb not ready after {limit:?}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until HAProxy reports `server` in state `want`; returns when.
pub async fn wait_state(env: &Env, server: &str, want: &str, limit: Duration) -> tokio::time::Instant {
    let what = format!("{server} {want}");
    wait_haproxy(env, limit, &what, |s| s.iter().any(|x| x.name == server && x.state().as_str() == want))
        .await
}

/// Four clients opening connections through the load balancer
/// continuously.
pub fn client_load(env: &Env) -> apilb_testkit::testapi::Load {
    apilb_testkit::testapi::Load::start(
        env.lab.listen,
        env.lab.client_tls().unwrap(),
        Some(env.lab.token.clone()),
        4,
    )
}

/// A load report in one line.
pub fn describe(r: &apilb_testkit::testapi::LoadReport) -> String {
    format!("{} ok, {} failed: {:?}", r.ok, r.failed, r.errors)
}
