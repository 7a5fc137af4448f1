//! checkload: what the health checks of a fleet cost the server they check
//! (issue 15). N simulated nodes check one real Go TLS server with
//! client-certificate authentication (etcd from the distribution, P-256
//! certificates made with openssl, as scripts/test-crash-under-load does)
//! once a second, on its cheap endpoint (`/health`), three ways:
//!
//! - **seed-004**: the hand-written baseline's check as users run it
//!   (`check check-ssl verify none`, no credential, `inter 1000`).
//! - **apilb-now**: apilb's current check, its server options from
//!   `render::server_params` (verified TLS, `check-sni`, the client
//!   certificate, `inter 1s fastinter 250ms`), a new TLS connection per check.
//! - **persistent**: [`apilb::check::Checker`], one kept-alive TLS connection
//!   per node, one request per second on it, alone.
//! - **persistent + backstop 30s**: the design as shipped
//!   (`health.checker: persistent`, `backstop_interval: 30s`): the same
//!   checkers and, at the same time, HAProxy's backstop check, its `server`
//!   lines from `render::server_params` with that config (the timing of
//!   `CheckPlan::with_backstop`: `inter 30s fastinter 1s downinter 30s`),
//!   so the server's CPU includes the backstop's handshakes.
//!
//! HAProxy nodes are `server` lines spread over a few HAProxy processes; the
//! persistent nodes are checkers in this process. The server's CPU is
//! utime + stime of the etcd process over a fixed window, minus etcd's own
//! idle CPU measured over the same window first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::check::{Checker, Settings, Target, phase_for};
use apilb::config::Config;
use apilb::haproxy::{cli, stat};
use apilb::inputs::Inputs;
use apilb::layout::Paths;
use apilb::render::{self, CheckPlan, Features};
use serde_json::{Value, json};

use crate::footprint::usage;
use crate::lbs::{path_env, poll};
use crate::report::table;

/// How big and how long.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Simulated nodes (checks per second on the server).
    pub nodes: usize,
    /// HAProxy processes the HAProxy nodes are spread over.
    pub processes: usize,
    /// Time for every check to be running before the window.
    pub warmup: Duration,
    /// The measuring window.
    pub window: Duration,
    /// Rounds of the three setups (interleaved against drifting load).
    pub rounds: usize,
    /// The endpoints checked, each measured separately: `/health` does a
    /// linearizable read through raft (some work per request, like
    /// `/readyz`), `/version` is static (the bare cost of a request).
    pub paths: &'static [&'static str],
}

/// The setups measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Seed004,
    ApilbNow,
    Persistent,
    /// The checkers and HAProxy's backstop check every 30 s (the default),
    /// both running.
    Backstop,
    /// The same with the backstop every 60 s (the 5,000-node setting of
    /// docs/health-checks.md).
    Backstop60,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Seed004 => "seed-004",
            Setup::ApilbNow => "apilb-now",
            Setup::Persistent => "persistent",
            Setup::Backstop => "persistent + backstop 30s",
            Setup::Backstop60 => "persistent + backstop 60s",
        }
    }
    fn what(self) -> &'static str {
        match self {
            Setup::Seed004 => "HAProxy check, new TLS connection, verify none, no credential",
            Setup::ApilbNow => "HAProxy check, new TLS connection, verified, client cert",
            Setup::Persistent => "apilb::check, one kept-alive TLS connection, verified, client cert",
            Setup::Backstop => {
                "measured: apilb::check as above + HAProxy backstop check every 30 s (checker: persistent), \
                 both running"
            }
            Setup::Backstop60 => {
                "measured: apilb::check as above + HAProxy backstop check every 60 s (checker: persistent), \
                 both running"
            }
        }
    }

    /// A file name for this setup's files.
    fn file(self) -> &'static str {
        match self {
            Setup::Seed004 => "seed-004",
            Setup::ApilbNow => "apilb-now",
            Setup::Persistent => "persistent",
            Setup::Backstop => "backstop",
            Setup::Backstop60 => "backstop-60",
        }
    }

    /// HAProxy checks the nodes (all but the checkers alone).
    fn haproxy(self) -> bool {
        self != Setup::Persistent
    }

    /// apilb's checkers check the nodes.
    fn checkers(self) -> bool {
        matches!(self, Setup::Persistent | Setup::Backstop | Setup::Backstop60)
    }

    /// apilb's config has `health.checker: persistent`.
    /// With the persistent checker: its `backstop_interval`.
    fn backstop(self) -> Option<&'static str> {
        match self {
            Setup::Backstop60 => Some("60s"),
            s if s.checkers() => Some("30s"),
            _ => None,
        }
    }
}

/// Files and ports of one run.
struct Work {
    /// Holds everything; removed at the end.
    dir: tempfile::TempDir,
    /// etcd's client port.
    port: u16,
}

impl Work {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.env("PATH", path_env()).output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// CA, server and client certificates (P-256), with openssl.
fn certs(dir: &Path) -> Result<(), String> {
    let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
  -out ca.crt -days 2 -subj /CN=load-ca 2>/dev/null
cert() {
  printf '%b' "$3" >"$1.ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" \
    -out "$1.csr" -subj "$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out "$1.crt" -days 2 -extfile "$1.ext" 2>/dev/null
}
cert server /CN=etcd 'subjectAltName=DNS:etcd,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n'
cert client /CN=load 'extendedKeyUsage=clientAuth\n'
"#;
    run(Command::new("sh").arg("-c").arg(script).current_dir(dir))
}

fn free_port() -> Result<u16, String> {
    apilb_testkit::lab::free_port(None).map_err(|e| e.to_string())
}

/// Starts etcd with TLS and client-certificate authentication.
fn etcd(work: &Work) -> Result<Proc, String> {
    let peer = free_port()?;
    let d = work.dir.path();
    let client = format!("https://127.0.0.1:{}", work.port);
    let peer = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(work.path("etcd.log")).map_err(|e| e.to_string())?;
    let child = Command::new("etcd")
        .args(["--name", "load", "--data-dir"])
        .arg(d.join("etcd"))
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("load={peer}")])
        .arg("--cert-file")
        .arg(d.join("server.crt"))
        .arg("--key-file")
        .arg(d.join("server.key"))
        .arg("--client-cert-auth")
        .arg("--trusted-ca-file")
        .arg(d.join("ca.crt"))
        // A rejected handshake (seed-004 sends no certificate) is logged
        // at warning level; logging is not what is measured.
        .args(["--logger", "zap", "--log-level", "error"])
        .env("PATH", path_env())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start etcd (apt-get install etcd-server): {e}"))?;
    Ok(Proc(child))
}

/// apilb's config for checking etcd the way it checks an API server; with
/// `persistent`, the settings docs/health-checks.md advises for 1 s
/// detection with the persistent checker (rise 2, fall 1, backstop 30s).
fn apilb_config(work: &Work, path: &str, backstop: Option<&str>) -> Result<(Config, Inputs), String> {
    let d = work.dir.path().display();
    let checker = match backstop {
        Some(b) => format!("  rise: 2\n  fall: 1\n  checker: persistent\n  backstop_interval: {b}\n"),
        None => String::new(),
    };
    let yaml = format!(
        "masters:\n  - {{name: etcd, address: \"127.0.0.1:{port}\"}}\n\
         health:\n  path: {path}\n  interval: 1s\n  timeout: 1s\n{checker}\
         \x20 tls: {{ca_file: {d}/ca.crt, server_name: etcd}}\n\
         \x20 auth: {{mode: client_cert, cert_file: {d}/client.crt, key_file: {d}/client.key}}\n\
         haproxy:\n  runtime_dir: {d}/run\n  state_dir: {d}/state\n",
        port = work.port
    );
    let config = Config::parse(&yaml, "checkload").map_err(|e| e.to_string())?;
    let inputs = Inputs::gather(&config).map_err(|e| e.to_string())?;
    Ok((config, inputs))
}

/// The HAProxy configs of `setup`, one per process.
fn haproxy_configs(
    setup: Setup,
    work: &Work,
    config: &Config,
    inputs: &Inputs,
    sizes: Sizes,
) -> Result<Vec<String>, String> {
    let path = &config.health.path.0;
    let (backend, params) = match setup {
        Setup::Seed004 => (
            // tests/migration/seed-004.haproxy.cfg.in, on etcd's endpoint.
            format!(
                "    option httpchk GET {path}\n    http-check expect status 401\n    \
                 default-server inter 1000 rise 2 fall 2\n"
            ),
            "check check-ssl verify none".to_owned(),
        ),
        Setup::ApilbNow | Setup::Backstop | Setup::Backstop60 => {
            // apilb's render path: the CA copy and client bundle it writes,
            // the check it sends, the server options of server_params.
            // Backstop: the config has checker: persistent, so CheckPlan::new
            // renders the backstop's timing (CheckPlan::with_backstop).
            let paths = Paths::from_config(config);
            let rendered = render::render(config, inputs, &paths, Features::default());
            std::fs::create_dir_all(&paths.runtime_dir).map_err(|e| e.to_string())?;
            for f in &rendered.aux_files {
                std::fs::write(&f.path, f.contents.expose()).map_err(|e| e.to_string())?;
            }
            let plan = CheckPlan::new(config, inputs, &paths, Features::default());
            let send = format!(
                "    option httpchk\n    http-check send meth GET uri {path} ver HTTP/1.1 hdr Host etcd\n    \
                 http-check expect status 200\n"
            );
            (send, render::server_params(&plan, &config.masters[0]))
        }
        Setup::Persistent => return Ok(Vec::new()),
    };
    let per = sizes.nodes.div_ceil(sizes.processes);
    let mut out = Vec::new();
    for p in 0..sizes.processes {
        let n = per.min(sizes.nodes - (p * per).min(sizes.nodes));
        let servers: String = (0..n)
            .map(|i| format!("    server n{} 127.0.0.1:{} {params}\n", p * per + i, work.port))
            .collect();
        out.push(format!(
            "global\n    maxconn 2000\n    stats socket {sock} mode 600 level admin\n\
             defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 10s\n    \
             timeout server 10s\n    timeout check 1s\n\
             frontend f\n    bind 127.0.0.1:{front}\n    default_backend checks\n\
             backend checks\n{backend}{servers}",
            sock = work.path(&format!("{}-{p}.sock", setup.file())).display(),
            front = free_port()?,
        ));
    }
    Ok(out)
}

/// What one setup measured.
struct Measured {
    /// etcd CPU seconds per second over the window (idle included).
    server_cpu: f64,
    /// CPU seconds per second of the checking side (HAProxy processes
    /// and/or this process's checkers).
    client_cpu: f64,
    /// Checks passing at the end of the window (the checkers' verdicts
    /// when there are checkers, else HAProxy's).
    passing: usize,
    /// TLS handshakes during the window, when known (checkers count them;
    /// HAProxy's are not counted).
    handshakes: Option<u64>,
    /// With the backstop: HAProxy servers whose backstop check has run at
    /// least once since HAProxy started (warmup + window).
    backstop_checked: Option<usize>,
    /// With HAProxy: the parameters of its `server` lines.
    server_params: Option<String>,
}

fn cpu_of(pids: &[u32]) -> Duration {
    pids.iter().filter_map(|p| usage(*p)).map(|u| u.cpu).sum()
}

/// etcd and `pids` over the window.
async fn window(etcd: u32, pids: &[u32], sizes: Sizes) -> (f64, f64) {
    let (e0, c0, t0) = (cpu_of(&[etcd]), cpu_of(pids), Instant::now());
    tokio::time::sleep(sizes.window).await;
    let secs = t0.elapsed().as_secs_f64();
    let (e1, c1) = (cpu_of(&[etcd]), cpu_of(pids));
    ((e1 - e0).as_secs_f64() / secs, (c1 - c0).as_secs_f64() / secs)
}

/// The HAProxy processes of `setup`, running with their stats sockets
/// answering, and the parameters of their `server` lines.
async fn start_haproxy(
    setup: Setup,
    work: &Work,
    config: &Config,
    inputs: &Inputs,
    sizes: Sizes,
) -> Result<(Vec<Proc>, Vec<PathBuf>, String), String> {
    let mut procs = Vec::new();
    let mut socks = Vec::new();
    let mut params = String::new();
    for (p, text) in haproxy_configs(setup, work, config, inputs, sizes)?.into_iter().enumerate() {
        if params.is_empty()
            && let Some(line) = text.lines().find(|l| l.trim_start().starts_with("server "))
        {
            params = line.trim().splitn(4, ' ').nth(3).unwrap_or_default().to_owned();
        }
        let cfg = work.path(&format!("{}-{p}.cfg", setup.file()));
        std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
        let log = std::fs::File::create(work.path(&format!("{}-{p}.log", setup.file())))
            .map_err(|e| e.to_string())?;
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&cfg)
            .env("PATH", path_env())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start haproxy: {e}"))?;
        procs.push(Proc(child));
        socks.push(work.path(&format!("{}-{p}.sock", setup.file())));
    }
    for s in &socks {
        poll(Duration::from_secs(10), "the HAProxy stats socket", || async {
            cli::command(s, "show info", Duration::from_secs(1)).await.ok().map(|_| ())
        })
        .await?;
    }
    Ok((procs, socks, params))
}

/// One kept-alive checker per node, in this process.
fn spawn_checkers(
    work: &Work,
    config: &Config,
    inputs: &Inputs,
    sizes: Sizes,
) -> Result<Vec<Checker>, String> {
    let tls = apilb::check::client_config(inputs).map_err(|e| e.to_string())?;
    let base = Settings::from_config(config, inputs);
    (0..sizes.nodes)
        .map(|i| {
            let settings = Settings { phase: phase_for(&format!("node-{i}"), base.interval), ..base.clone() };
            let target = Target { name: format!("n{i}"), address: format!("127.0.0.1:{}", work.port) };
            Checker::spawn(target, Arc::new(settings), tls.clone()).map_err(|e| e.to_string())
        })
        .collect()
}

/// The servers of HAProxy's `show stat` on every socket.
async fn haproxy_servers(socks: &[PathBuf]) -> Vec<stat::ServerStat> {
    let mut out = Vec::new();
    for s in socks {
        let text = cli::command(s, "show stat", Duration::from_secs(2)).await.unwrap_or_default();
        out.extend(stat::parse_show_stat(&text).map(|s| s.servers).unwrap_or_default());
    }
    out
}

async fn measure(setup: Setup, work: &Work, etcd: u32, path: &str, sizes: Sizes) -> Result<Measured, String> {
    let (config, inputs) = apilb_config(work, path, setup.backstop())?;
    // HAProxy first: its backstop checks are spread over their interval
    // from its start, so they are all running by the window.
    let (procs, socks, params) = if setup.haproxy() {
        start_haproxy(setup, work, &config, &inputs, sizes).await?
    } else {
        (Vec::new(), Vec::new(), String::new())
    };
    let checkers = if setup.checkers() { spawn_checkers(work, &config, &inputs, sizes)? } else { Vec::new() };
    tokio::time::sleep(sizes.warmup).await;
    let mut pids: Vec<u32> = procs.iter().map(|p| p.0.id()).collect();
    if !checkers.is_empty() {
        pids.push(std::process::id());
    }
    let handshakes = || checkers.iter().map(|c| c.report().handshakes).sum::<u64>();
    let h0 = handshakes();
    let (server_cpu, client_cpu) = window(etcd, &pids, sizes).await;
    let h1 = handshakes();
    let servers = haproxy_servers(&socks).await;
    let passing = if checkers.is_empty() {
        servers.iter().filter(|s| s.status == "UP").count()
    } else {
        checkers.iter().filter(|c| c.report().verdict.is_up()).count()
    };
    let backstop_checked = matches!(setup, Setup::Backstop | Setup::Backstop60)
        .then(|| servers.iter().filter(|s| !s.check_status.is_empty() && s.check_status != "INI").count());
    drop(checkers);
    drop(procs);
    Ok(Measured {
        server_cpu,
        client_cpu,
        passing,
        handshakes: setup.checkers().then_some(h1 - h0),
        backstop_checked,
        server_params: (!params.is_empty()).then_some(params),
    })
}

/// Runs the section.
pub async fn bench(sizes: Sizes) -> Value {
    println!(
        "## checkload: what {} nodes checking once a second cost the server (issue 15)\n\n\
         Server: etcd (Go crypto/tls, client-certificate auth, P-256), endpoints {}. \
         CPU = utime+stime of etcd over {:?} windows, minus its idle CPU; {} round(s), setups interleaved. \
         Per node = per check at 1 check/s. Cores per API server = per node × nodes (1 check/s each).\n",
        sizes.nodes,
        sizes.paths.join(" and "),
        sizes.window,
        sizes.rounds
    );
    match bench_inner(sizes).await {
        Ok(v) => v,
        Err(e) => {
            println!("checkload failed: {e}\n");
            json!({"error": e})
        }
    }
}

async fn bench_inner(sizes: Sizes) -> Result<Value, String> {
    let dir = tempfile::Builder::new().prefix("apilb-checkload-").tempdir().map_err(|e| e.to_string())?;
    let work = Work { dir, port: free_port()? };
    certs(work.dir.path())?;
    let etcd_proc = etcd(&work)?;
    let etcd_pid = etcd_proc.0.id();
    let (config, inputs) = apilb_config(&work, "/health", None)?;
    // Ready when apilb's own checker says so.
    {
        let tls = apilb::check::client_config(&inputs).map_err(|e| e.to_string())?;
        let settings = Settings { phase: Duration::ZERO, ..Settings::from_config(&config, &inputs) };
        let c = Checker::spawn(
            Target { name: "ready".into(), address: format!("127.0.0.1:{}", work.port) },
            Arc::new(settings),
            tls,
        )
        .map_err(|e| e.to_string())?;
        let mut rx = c.watch();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|r| r.verdict.is_up()))
            .await
            .map_err(|_| format!("etcd did not become healthy (log: {})", work.path("etcd.log").display()))?
            .map_err(|e| e.to_string())?;
    }
    let etcd_version = Command::new("etcd")
        .arg("--version")
        .env("PATH", path_env())
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (idle, _) = window(etcd_pid, &[], sizes).await;
    println!("{etcd_version}; idle: {:.2} % of one core\n", idle * 100.0);
    let mut by_path = serde_json::Map::new();
    for path in sizes.paths {
        by_path.insert((*path).to_owned(), one_path(&work, etcd_pid, path, sizes, idle).await?);
    }
    drop(etcd_proc);
    Ok(json!({
        "settings": {"nodes": sizes.nodes, "haproxy_processes": sizes.processes,
                     "window_s": sizes.window.as_secs(), "warmup_s": sizes.warmup.as_secs(), "rounds": sizes.rounds},
        "server": etcd_version,
        "idle_cpu": (idle * 1e4).round() / 1e4,
        "paths": by_path,
    }))
}

/// The four setups on one endpoint: the rounds, the table, the JSON.
async fn one_path(work: &Work, etcd_pid: u32, path: &str, sizes: Sizes, idle: f64) -> Result<Value, String> {
    println!("### GET {path}\n");
    let setups = [Setup::Seed004, Setup::ApilbNow, Setup::Persistent, Setup::Backstop, Setup::Backstop60];
    let mut samples: Vec<Vec<Measured>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 0..sizes.rounds {
        for (i, s) in setups.iter().enumerate() {
            let m = measure(*s, work, etcd_pid, path, sizes).await?;
            let backstop = m
                .backstop_checked
                .map(|n| format!("  backstop checked {n}/{}", sizes.nodes))
                .unwrap_or_default();
            println!(
                "    round {}: {:<25} etcd {:>6.2} %  checking side {:>6.2} %  passing {}/{}{backstop}",
                round + 1,
                s.name(),
                m.server_cpu * 100.0,
                m.client_cpu * 100.0,
                m.passing,
                sizes.nodes
            );
            samples[i].push(m);
        }
    }
    println!();
    let n = sizes.nodes as f64;
    let mean = |v: &[Measured], f: fn(&Measured) -> f64| v.iter().map(f).sum::<f64>() / v.len().max(1) as f64;
    // Per node: CPU seconds per second per node above idle.
    let per_node: Vec<f64> =
        samples.iter().map(|v| ((mean(v, |m| m.server_cpu) - idle) / n).max(0.0)).collect();
    let current = per_node[1];
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let v = &samples[i];
        let pn = per_node[i];
        let ratio = if current > 0.0 { pn / current } else { f64::NAN };
        let client = mean(v, |m| m.client_cpu) / n;
        let passing = v.last().map_or(0, |m| m.passing);
        let handshakes = v.last().and_then(|m| m.handshakes);
        rows.push(vec![
            s.name().to_owned(),
            s.what().to_owned(),
            format!("{:.3} ms", pn * 1e3),
            format!("{ratio:.2}×"),
            format!("{:.2}", pn * 1000.0),
            format!("{:.2}", pn * 5000.0),
            format!("{:.3} ms", client * 1e3),
            format!("{passing}/{}", sizes.nodes),
            handshakes.map_or("-".into(), |h| h.to_string()),
        ]);
        runs.push(json!({
            "setup": s.name(),
            "what": s.what(),
            "server_cpu_per_round": v.iter().map(|m| m.server_cpu).collect::<Vec<_>>(),
            "server_cpu_ms_per_node_s": (pn * 1e6).round() / 1e3,
            "ratio_to_apilb_now": (ratio * 1000.0).round() / 1000.0,
            "cores_per_server_1000_nodes": (pn * 1000.0 * 100.0).round() / 100.0,
            "cores_per_server_5000_nodes": (pn * 5000.0 * 100.0).round() / 100.0,
            "checking_side_cpu_ms_per_node_s": (client * 1e6).round() / 1e3,
            "passing": passing,
            "tls_handshakes_in_window": handshakes,
            "backstop_servers_checked_since_start": v.last().and_then(|m| m.backstop_checked),
            "haproxy_server_params": v.last().and_then(|m| m.server_params.clone()),
        }));
    }
    println!(
        "{}",
        table(
            &[
                "setup",
                "check",
                "server CPU per node (per s)",
                "vs apilb-now",
                "cores/server at 1,000 nodes",
                "at 5,000",
                "checking side per node",
                "passing",
                "handshakes in window",
            ],
            &rows
        )
    );
    println!(
        "seed-004 sends no client certificate: etcd refuses its handshake at the Certificate message, so that \
         row is a lower bound (no client-certificate verification, no HTTP); kube-apiserver would complete it \
         and answer 401.\n"
    );
    let new = per_node[3];
    let ratio = if current > 0.0 { new / current } else { f64::NAN };
    println!(
        "new design (persistent + backstop 30s, measured) / apilb-now: {ratio:.2}× server CPU per node \
         (issue 15: ≤ 0.3×); {:.2} cores per API server at 1,000 nodes, {:.2} at 5,000 (apilb-now: {:.2}, {:.2})\n",
        new * 1000.0,
        new * 5000.0,
        current * 1000.0,
        current * 5000.0
    );
    Ok(json!({"runs": runs, "new_design_ratio_to_apilb_now": (ratio * 1000.0).round() / 1000.0}))
}
