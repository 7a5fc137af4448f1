//! The load balancers under test, each started from the same lab of test
//! API servers:
//!
//! - **apilb**: the real `apilb run` process, with the lab's config (apilb's
//!   default check settings), supervising its own HAProxy;
//! - **baseline**: what users run today (seed 004): HAProxy from the
//!   distribution with the hand-written config, started and reloaded the way
//!   Debian's haproxy.service does (`-Ws`, `haproxy -c` then `USR2`);
//! - **nginx**: the distribution's nginx stream proxy, as a peer for the
//!   overhead numbers only (it has no active checks).

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use apilb::haproxy::{cli, stat};
use apilb::layout::Paths;
use apilb_testkit::lab::{HealthSettings, Lab};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;

use crate::layout;

/// `PATH` with /usr/sbin, where Debian puts haproxy and nginx.
pub fn path_env() -> String {
    format!("{}:/usr/sbin", std::env::var("PATH").unwrap_or_default())
}

fn signal(pid: u32, sig: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// The pids whose parent is `parent` (HAProxy's workers are children of
/// its master).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.to_owned()))
                .and_then(|rest| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                == Some(parent)
        })
        .collect()
}

/// Polls `f` every 20 ms until it yields a value, at most `limit`.
pub async fn poll<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The backend's servers as HAProxy's runtime API shows them (apilb's
/// unchecked fail-open twins, `backup` servers, left out).
async fn servers(sock: &Path) -> Vec<stat::ServerStat> {
    let text = cli::command(sock, "show stat", Duration::from_secs(2)).await.unwrap_or_default();
    let servers = stat::parse_show_stat(&text).map(|s| s.servers).unwrap_or_default();
    servers.into_iter().filter(|s| !s.backup).collect()
}

/// Waits until HAProxy has `n` servers, all UP.
async fn all_up(sock: &Path, n: usize) -> Result<(), String> {
    poll(Duration::from_secs(30), "every master UP", || async {
        let s = servers(sock).await;
        (s.len() == n && s.iter().all(|s| s.status == "UP")).then_some(())
    })
    .await
}

/// A running `apilb run`.
pub struct Apilb {
    child: Child,
    /// The frontend.
    pub addr: SocketAddr,
    config: PathBuf,
    /// Where its files are (the HAProxy master's pidfile).
    paths: Paths,
    log: PathBuf,
}

impl Apilb {
    /// Writes the lab's config with `extra` YAML, starts the agent and
    /// waits until every master passed a check.
    pub async fn start(lab: &Lab, extra: &str) -> Result<Apilb, String> {
        lab.write_config(&lab.config_yaml(extra)).map_err(|e| e.to_string())?;
        let log = lab.path("apilb.log");
        let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new(env!("CARGO_BIN_EXE_apilb"))
            .args(["run", "--shutdown-grace", "1s", "--config"])
            .arg(lab.config_path())
            .env("PATH", path_env())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .map_err(|e| format!("cannot start apilb: {e}"))?;
        let mut lb = Apilb { child, addr: lab.listen, config: lab.config_path(), paths: layout(lab), log };
        let n = lab.servers.len();
        let sock = layout(lab).stats_socket();
        let up = poll(Duration::from_secs(30), "apilb serving", || {
            let exited = lb.child.try_wait().ok().flatten().is_some();
            let sock = sock.clone();
            async move {
                if exited {
                    return Some(false);
                }
                let s = servers(&sock).await;
                (s.len() == n && s.iter().all(|s| s.status == "UP")).then_some(true)
            }
        })
        .await;
        let error = match up {
            Ok(true) => return Ok(lb),
            Ok(false) => format!("apilb exited:\n{}", lb.logs()),
            Err(e) => format!("{e}\n{}", lb.logs()),
        };
        lb.stop().await;
        Err(error)
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The HAProxy master's pid.
    pub fn haproxy_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.paths.pidfile()).ok()?.trim().parse().ok()
    }

    /// Its log.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes `yaml` and runs `apilb reload` (systemd's ExecReload), which
    /// returns once the agent has applied it or refused it.
    pub async fn reload(&self, yaml: &str) -> Result<(), String> {
        apilb::fsutil::write_atomic(&self.config, yaml.as_bytes(), 0o600).map_err(|e| e.to_string())?;
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_apilb"))
            .args(["reload", "--pid", &self.pid().to_string(), "--config"])
            .arg(&self.config)
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("apilb reload: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Stops the agent (SIGTERM: it stops HAProxy gracefully); Drop kills
    /// whatever is left.
    pub async fn stop(mut self) {
        signal(self.pid(), Signal::SIGTERM);
        let _ = poll(Duration::from_secs(10), "apilb exit", || {
            let done = self.child.try_wait().ok().flatten().is_some();
            async move { done.then_some(()) }
        })
        .await;
    }
}

impl Drop for Apilb {
    /// Also on an error or an interrupted run: nothing outlives the bench.
    fn drop(&mut self) {
        let haproxy = self.haproxy_pid();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = haproxy {
            kill_tree(pid);
        }
    }
}

/// SIGKILLs a master process (HAProxy's, nginx's) and its workers. The
/// master is stopped first: nginx's would replace a killed worker, and the
/// replacement would outlive it.
fn kill_tree(master: u32) {
    signal(master, Signal::SIGSTOP);
    for pid in children_of(master) {
        signal(pid, Signal::SIGKILL);
    }
    signal(master, Signal::SIGKILL);
}

/// The hand-written setup of seed 004 as Debian runs it.
pub struct Baseline {
    child: Child,
    /// The frontend.
    pub addr: SocketAddr,
    spec: BaselineSpec,
}

/// Where the baseline's HAProxy listens and keeps its files.
struct BaselineSpec {
    addr: SocketAddr,
    dir: PathBuf,
    servers: Vec<(String, SocketAddr)>,
    stats: SocketAddr,
    sock: PathBuf,
    master_sock: PathBuf,
}

impl BaselineSpec {
    /// The config: Debian 12's default `global`/`defaults` (logging, chroot
    /// and user switching left out) and seed 004's frontend, backend and
    /// stats listener, the latter bound to loopback here.
    pub fn config(&self, connect_ms: u32) -> String {
        let servers: String = self
            .servers
            .iter()
            .map(|(name, addr)| format!("    server k8s-de1-{name} {addr} check check-ssl verify none\n"))
            .collect();
        format!(
            "global\n\
             \x20   stats socket {sock} mode 660 level admin\n\
             \x20   stats timeout 30s\n\
             \n\
             defaults\n\
             \x20   mode http\n\
             \x20   timeout connect {connect_ms}\n\
             \x20   timeout client  50000\n\
             \x20   timeout server  50000\n\
             \n\
             listen stats\n\
             \x20   bind {stats}\n\
             \x20   mode http\n\
             \x20   http-request use-service prometheus-exporter if {{ path /metrics }}\n\
             \x20   stats enable\n\
             \x20   stats uri /\n\
             \x20   stats refresh 5s\n\
             \n\
             frontend kubernetes_master_kube_api\n\
             \x20   bind {listen}\n\
             \x20   mode tcp\n\
             \x20   default_backend k8s-de1-kube-api\n\
             \n\
             backend k8s-de1-kube-api\n\
             \x20   mode tcp\n\
             \x20   balance roundrobin\n\
             \x20   option httpchk GET /readyz\n\
             \x20   http-check expect status 401\n\
             \x20   default-server inter 1000 rise 2 fall 2\n\
             {servers}",
            sock = self.sock.display(),
            stats = self.stats,
            listen = self.addr,
        )
    }

    fn cfg_path(&self) -> PathBuf {
        self.dir.join("haproxy.cfg")
    }
}

impl Baseline {
    /// Starts HAProxy with the baseline config over every server of the
    /// lab and waits until they are all UP.
    pub async fn start(lab: &Lab) -> Result<Baseline, String> {
        let dir = lab.path("baseline");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = |p| apilb_testkit::lab::free_port(p).map_err(|e| e.to_string());
        let addr = SocketAddr::from(([127, 0, 0, 1], port(None)?));
        let held = std::net::TcpListener::bind(addr).map_err(|e| e.to_string())?;
        let stats = SocketAddr::from(([127, 0, 0, 1], port(None)?));
        drop(held);
        let servers = lab.servers.iter().map(|s| (s.name().to_owned(), s.addr())).collect();
        let spec = BaselineSpec {
            addr,
            sock: dir.join("admin.sock"),
            master_sock: dir.join("master.sock"),
            dir,
            servers,
            stats,
        };
        std::fs::write(spec.cfg_path(), spec.config(5000)).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(spec.dir.join("haproxy.log")).map_err(|e| e.to_string())?;
        let child = Command::new("haproxy")
            .arg("-Ws")
            .arg("-f")
            .arg(spec.cfg_path())
            .arg("-p")
            .arg(spec.dir.join("haproxy.pid"))
            .arg("-S")
            .arg(&spec.master_sock)
            .env("PATH", path_env())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start haproxy: {e}"))?;
        let lb = Baseline { child, addr, spec };
        if let Err(e) = all_up(&lb.spec.sock, lb.spec.servers.len()).await {
            let log = std::fs::read_to_string(lb.spec.dir.join("haproxy.log")).unwrap_or_default();
            return Err(format!("baseline HAProxy: {e}\n{log}"));
        }
        Ok(lb)
    }

    /// The master's pid.
    pub fn haproxy_pid(&self) -> u32 {
        self.child.id()
    }

    async fn show_proc(&self) -> Option<stat::ProcInfo> {
        let text = cli::command(&self.spec.master_sock, "show proc", Duration::from_secs(2)).await.ok()?;
        stat::parse_show_proc(&text).ok()
    }

    /// `systemctl reload haproxy` on Debian: write the config, validate it,
    /// `kill -USR2` the master; returns once the master has a new worker.
    pub async fn reload(&self, connect_ms: u32) -> Result<(), String> {
        let before = self.show_proc().await.ok_or("no answer on the master socket")?;
        let cfg = self.spec.cfg_path();
        apilb::fsutil::write_atomic(&cfg, self.spec.config(connect_ms).as_bytes(), 0o644)
            .map_err(|e| e.to_string())?;
        let check = tokio::process::Command::new("haproxy")
            .args(["-Ws", "-c", "-q", "-f"])
            .arg(&cfg)
            .env("PATH", path_env())
            .status()
            .await
            .map_err(|e| e.to_string())?;
        if !check.success() {
            return Err("haproxy -c refused the config".into());
        }
        signal(self.haproxy_pid(), Signal::SIGUSR2);
        poll(Duration::from_secs(10), "the new worker", || async {
            let now = self.show_proc().await?;
            (now.reloads > before.reloads && !now.workers.is_empty()).then_some(())
        })
        .await
    }

    /// Kills the master and its workers.
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        kill_tree(self.haproxy_pid());
        let _ = self.child.wait();
    }
}

/// nginx's stream proxy over the lab's servers (round robin, no checks).
pub struct Nginx {
    child: Child,
    /// The frontend.
    pub addr: SocketAddr,
}

impl Nginx {
    /// The nginx binary, when the distribution's package is installed.
    pub fn binary() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx"].iter().map(PathBuf::from).find(|p| p.exists())
    }

    /// Starts nginx with a stream proxy over every server of the lab.
    pub async fn start(lab: &Lab, binary: &Path) -> Result<Nginx, String> {
        let dir = lab.path("nginx");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let addr = SocketAddr::from((
            [127, 0, 0, 1],
            apilb_testkit::lab::free_port(None).map_err(|e| e.to_string())?,
        ));
        let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
        let load =
            if module.exists() { format!("load_module {};\n", module.display()) } else { String::new() };
        let upstreams: String = lab.servers.iter().map(|s| format!("    server {};\n", s.addr())).collect();
        let conf = format!(
            "{load}daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             stream {{\n  upstream masters {{\n{upstreams}  }}\n  server {{\n    listen {addr};\n    \
             proxy_pass masters;\n    proxy_connect_timeout 3s;\n  }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).map_err(|e| e.to_string())?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start nginx: {e}"))?;
        let mut lb = Nginx { child, addr };
        let ok = poll(Duration::from_secs(10), "nginx listening", || {
            let exited = lb.child.try_wait().ok().flatten().is_some();
            async move {
                if exited {
                    return Some(false);
                }
                tokio::net::TcpStream::connect(addr).await.is_ok().then_some(true)
            }
        })
        .await;
        match ok {
            Ok(true) => Ok(lb),
            _ => Err(format!(
                "nginx did not start: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default().trim()
            )),
        }
    }
}

impl Drop for Nginx {
    /// Kills nginx and its workers.
    fn drop(&mut self) {
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

/// The HAProxy setups compared in the failover and reload runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbKind {
    /// apilb's agent and config.
    Apilb,
    /// apilb's agent with `health.checker: persistent` (issue 15), as
    /// docs/health-checks.md advises for 1 s detection: see
    /// [`persistent_health`].
    ApilbPersistent,
    /// Seed 004's hand-written config.
    Baseline,
}

impl LbKind {
    /// apilb (HAProxy's checks) and the baseline, apilb first: the reload
    /// comparison.
    pub const BOTH: [LbKind; 2] = [LbKind::Apilb, LbKind::Baseline];

    /// The failover comparison: apilb with HAProxy's checks, with the
    /// persistent checker, and the baseline.
    pub const FAILOVER: [LbKind; 3] = [LbKind::Apilb, LbKind::ApilbPersistent, LbKind::Baseline];

    /// Its name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            LbKind::Apilb => "apilb",
            LbKind::ApilbPersistent => "apilb (persistent checker)",
            LbKind::Baseline => "baseline",
        }
    }
}

/// The check settings of [`LbKind::ApilbPersistent`], the ones
/// docs/health-checks.md and tests/fleet.rs use for 1 s detection:
/// interval 1s, timeout 1s, rise 2, fall 1, the persistent checker, and
/// HAProxy's own check as a backstop every 30 s (the default).
pub fn persistent_health() -> HealthSettings {
    HealthSettings {
        interval: "1s".into(),
        timeout: "1s".into(),
        rise: 2,
        fall: 1,
        extra: "  checker: persistent\n  backstop_interval: 30s\n".into(),
    }
}

/// A running apilb or baseline.
pub enum Lb {
    /// apilb's agent and its HAProxy.
    Apilb(Apilb),
    /// The baseline's HAProxy.
    Baseline(Baseline),
}

impl Lb {
    /// Starts `kind` over every server of the lab; returns once all are UP.
    /// For [`LbKind::ApilbPersistent`] the lab's check settings become
    /// [`persistent_health`] (so later configs, [`Lb::change`], keep them).
    pub async fn start(kind: LbKind, lab: &mut Lab) -> Result<Lb, String> {
        Ok(match kind {
            LbKind::Apilb => Lb::Apilb(Apilb::start(lab, "").await?),
            LbKind::ApilbPersistent => {
                lab.health = persistent_health();
                Lb::Apilb(Apilb::start(lab, "").await?)
            }
            LbKind::Baseline => Lb::Baseline(Baseline::start(lab).await?),
        })
    }

    /// The frontend.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Lb::Apilb(a) => a.addr,
            Lb::Baseline(b) => b.addr,
        }
    }

    /// The HAProxy master's pid.
    pub fn haproxy_pid(&self) -> Option<u32> {
        match self {
            Lb::Apilb(a) => a.haproxy_pid(),
            Lb::Baseline(b) => Some(b.haproxy_pid()),
        }
    }

    /// The `i`-th config change: a different connect timeout, which changes
    /// haproxy.cfg and so takes a reload, the way operators apply changes
    /// (`systemctl reload`).
    pub async fn change(&self, lab: &Lab, i: u32) -> Result<(), String> {
        match self {
            Lb::Apilb(a) => {
                a.reload(&lab.config_yaml(&format!("timeouts:\n  connect: {}ms\n", 3000 + i))).await
            }
            Lb::Baseline(b) => b.reload(5000 + i).await,
        }
    }

    /// Stops it and everything it started.
    pub async fn stop(self) {
        match self {
            Lb::Apilb(a) => a.stop().await,
            Lb::Baseline(b) => b.stop(),
        }
    }
}
