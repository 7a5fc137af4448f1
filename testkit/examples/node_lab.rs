//! The host side of `scripts/test-systemd` (the systemd node lab). Not part
//! of the shipped binary: a thin user of the test kit's `lab` and
//! `testapi`.
//!
//! The lab boots Debian containers with systemd-nspawn; they share this
//! machine's network namespace, so the test API servers started here on
//! 127.0.0.1 are the masters of the apilb installed in the container, and
//! the clients started here measure the container's endpoint.
//!
//! ```text
//! node_lab masters --out DIR [--node-dir /etc/apilb-lab] [--masters 3]
//!     Starts the test API servers and writes into DIR what the node needs
//!     (ca.crt, node.crt, node.key, token: to be copied to --node-dir) and
//!     three configs for it: apilb.yaml, apilb-changed.yaml (a good change:
//!     one master fewer, another balance) and apilb-invalid.yaml (rejected
//!     by `apilb check`); role-vars.json sets the Ansible role to the same
//!     masters, endpoint and CA (with the token as credential). DIR/lab.json
//!     tells the clients where the endpoint is; DIR/ready appears last. Serves until SIGTERM, SIGINT or
//!     --max-seconds.
//! node_lab probe --lab DIR
//!     One TLS request (GET /version, with the token) through the endpoint;
//!     prints {"server": NAME, "ms": N}, exits 1 with the error otherwise.
//! node_lab load --lab DIR --stop-file FILE [--clients 2] [--hold 40] [--probe-ms N] [--pace-ms N]
//!     Opens --hold long-lived connections, then keeps --clients clients
//!     opening a new connection per request (back to back, or one every
//!     --pace-ms each) until FILE exists (or
//!     --max-seconds), then asks every held connection once more. Prints
//!     the counts as JSON on stdout. With --probe-ms, also connects to the
//!     endpoint (TCP only) every N ms and reports the windows in which it
//!     refused connections (scripts/test-migration measures a switch
//!     between two load balancers on the port with it).
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb_testkit::lab::{Lab, LabAuth, LabOptions};
use apilb_testkit::testapi::pool::{Pool, PoolOptions};
use apilb_testkit::testapi::{ApiServer, Failure, Load, LoadReport, Session, Success};
use clap::{Parser, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Host side of scripts/test-systemd: test masters and clients for a containerized node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the test API servers and write the node's files.
    Masters {
        /// Where to write the node's files, lab.json and ready.
        #[arg(long)]
        out: PathBuf,
        /// Where the node's files will be inside the container.
        #[arg(long, default_value = "/etc/apilb-lab")]
        node_dir: PathBuf,
        /// How many API servers.
        #[arg(long, default_value_t = 3)]
        masters: usize,
        /// Stop serving after this long, whatever happens (a safety net).
        #[arg(long, default_value_t = 1800)]
        max_seconds: u64,
    },
    /// One request through the endpoint.
    Probe {
        /// The directory `masters --out` wrote.
        #[arg(long)]
        lab: PathBuf,
    },
    /// Clients under load and held connections, until the stop file exists.
    Load {
        /// The directory `masters --out` wrote.
        #[arg(long)]
        lab: PathBuf,
        /// The load stops once this file exists.
        #[arg(long)]
        stop_file: PathBuf,
        /// Written once the held connections are open and the load runs.
        #[arg(long)]
        started_file: Option<PathBuf>,
        /// Clients each opening a new connection per request.
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Long-lived connections held through the run.
        #[arg(long, default_value_t = 40)]
        hold: usize,
        /// Stop after this long even without the stop file.
        #[arg(long, default_value_t = 300)]
        max_seconds: u64,
        /// Also try a TCP connection to the endpoint every this many
        /// milliseconds and report when it was refused (0: off).
        #[arg(long, default_value_t = 0)]
        probe_ms: u64,
        /// Each client starts a request at most every this many
        /// milliseconds (0: back to back, as fast as the machine allows).
        #[arg(long, default_value_t = 0)]
        pace_ms: u64,
    },
}

/// What the clients need to know about the lab (DIR/lab.json).
#[derive(Serialize, Deserialize)]
struct LabInfo {
    /// The node's endpoint (apilb's `listen`).
    listen: SocketAddr,
    /// apilb's metrics address on the node.
    metrics: SocketAddr,
    /// The token the test servers accept.
    token: String,
    /// name → address of each test server.
    masters: Vec<(String, SocketAddr)>,
}

impl LabInfo {
    fn read(dir: &Path) -> Result<(LabInfo, Arc<rustls::ClientConfig>), String> {
        let text = std::fs::read_to_string(dir.join("lab.json")).map_err(|e| format!("lab.json: {e}"))?;
        let info: LabInfo = serde_json::from_str(&text).map_err(|e| format!("lab.json: {e}"))?;
        let ca = std::fs::read_to_string(dir.join("ca.crt")).map_err(|e| format!("ca.crt: {e}"))?;
        let tls = apilb_testkit::testapi::client_tls(&ca, None).map_err(|e| e.to_string())?;
        Ok((info, tls))
    }
}

fn write(path: &Path, data: &str) -> Result<(), String> {
    apilb::fsutil::write_atomic(path, data.as_bytes(), 0o600).map_err(|e| format!("{}: {e}", path.display()))
}

/// The node's apilb.yaml over `servers`, naming the files under `node_dir`.
fn node_config(lab: &Lab, servers: &[&ApiServer], node_dir: &Path, extra: &str) -> String {
    let d = node_dir.display();
    format!(
        "# apilb on a node of the systemd lab (generated by examples/node_lab.rs)\n\
         listen: \"{listen}\"\n\
         masters:\n{masters}\
         health:\n  interval: 1s\n  timeout: 1s\n  rise: 2\n  fall: 2\n\
         \x20 tls: {{ca_file: {d}/ca.crt, server_name: kubernetes}}\n\
         \x20 auth: {{mode: client_cert, cert_file: {d}/node.crt, key_file: {d}/node.key}}\n\
         metrics:\n  listen: \"{metrics}\"\n{extra}",
        listen = lab.listen,
        masters = lab.masters_yaml(servers),
        metrics = lab.metrics,
    )
}

async fn masters(out: &Path, node_dir: &Path, n: usize, max: Duration) -> Result<(), String> {
    let lab =
        Lab::start(LabOptions { masters: n.max(2), auth: LabAuth::ClientCert, ..LabOptions::default() })
            .await
            .map_err(|e| format!("cannot start the test API servers: {e}"))?;
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    write(&out.join("ca.crt"), &lab.pki.ca_pem())?;
    write(&out.join("node.crt"), &lab.node_cert.cert_pem)?;
    write(&out.join("node.key"), &lab.node_cert.key_pem)?;
    write(&out.join("token"), &format!("{}\n", lab.token))?;
    let all: Vec<&ApiServer> = lab.servers.iter().collect();
    write(&out.join("apilb.yaml"), &node_config(&lab, &all, node_dir, ""))?;
    write(
        &out.join("apilb-changed.yaml"),
        &node_config(&lab, &all[..all.len() - 1], node_dir, "balance: roundrobin\n"),
    )?;
    let invalid = node_config(&lab, &all, node_dir, "").replace("  rise: 2\n", "  rise: 0\n");
    write(&out.join("apilb-invalid.yaml"), &invalid)?;
    let info = LabInfo {
        listen: lab.listen,
        metrics: lab.metrics,
        token: lab.token.clone(),
        masters: lab.servers.iter().map(|s| (s.name().to_owned(), s.addr())).collect(),
    };
    write(&out.join("lab.json"), &serde_json::to_string_pretty(&info).map_err(|e| e.to_string())?)?;
    let role_vars = json!({
        "apilb_masters": info.masters.iter()
            .map(|(name, addr)| json!({"name": name, "address": addr.to_string()}))
            .collect::<Vec<_>>(),
        "apilb_listen_port": lab.listen.port(),
        "apilb_metrics_listen": lab.metrics.to_string(),
        "apilb_tls_ca_pem": lab.pki.ca_pem(),
        "apilb_auth_mode": "bearer",
        "apilb_auth_token": lab.token,
    });
    write(
        &out.join("role-vars.json"),
        &serde_json::to_string_pretty(&role_vars).map_err(|e| e.to_string())?,
    )?;
    write(&out.join("ready"), "")?;

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(max) => eprintln!("node_lab masters: stopping after {max:?} (--max-seconds)"),
    }
    Ok(())
}

async fn probe(dir: &Path) -> Result<(), String> {
    let (info, tls) = LabInfo::read(dir)?;
    let started = Instant::now();
    let server = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = Session::connect(info.listen, tls, Some(&info.token)).await?;
        s.served_by().await
    })
    .await
    .unwrap_or_else(|_| Err("no answer within 10s".into()))
    .map_err(|e| format!("{}: {e}", info.listen))?;
    println!("{}", json!({"server": server, "ms": started.elapsed().as_millis() as u64}));
    Ok(())
}

struct LoadArgs {
    stop_file: PathBuf,
    started_file: Option<PathBuf>,
    clients: usize,
    hold: usize,
    max: Duration,
    probe: Option<Duration>,
    pace: Option<Duration>,
}

/// Clients like [`Load`]'s, each starting a request at most every `pace`:
/// a steady rate that measures a switch without taking the machine's CPU
/// from what is measured (a 2-core machine also runs Ansible and systemd).
struct PacedLoad {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl PacedLoad {
    fn start(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: String,
        clients: usize,
        pace: Duration,
    ) -> PacedLoad {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let tasks = (0..clients)
            .map(|_| {
                let (tls, token, mut rx) = (tls.clone(), token.clone(), rx.clone());
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    let mut ticks = tokio::time::interval(pace);
                    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = ticks.tick() => {}
                            _ = rx.changed() => break,
                        }
                        let started = Instant::now();
                        let outcome = tokio::time::timeout(Duration::from_secs(30), async {
                            let mut s = Session::connect(addr, tls.clone(), Some(&token)).await?;
                            s.served_by().await
                        })
                        .await
                        .unwrap_or_else(|_| Err("no answer within 30s".into()));
                        match outcome {
                            Ok(server) => {
                                report.ok += 1;
                                *report.by_server.entry(server.clone()).or_default() += 1;
                                report.successes.push(Success { started, took: started.elapsed(), server });
                            }
                            Err(error) => {
                                report.failed += 1;
                                if report.errors.len() < 20 {
                                    report.errors.push(format!("{error} (after {:?})", started.elapsed()));
                                }
                                if report.failures.len() < 1000 {
                                    report.failures.push(Failure { started, ended: Instant::now(), error });
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        PacedLoad { stop, tasks }
    }

    async fn stop(self) -> LoadReport {
        let _ = self.stop.send(true);
        LoadReport::sum(self.tasks).await
    }
}

/// Either kind of clients.
enum Clients {
    Fast(Load),
    Paced(PacedLoad),
}

impl Clients {
    async fn stop(self) -> LoadReport {
        match self {
            Clients::Fast(l) => l.stop().await,
            Clients::Paced(l) => l.stop().await,
        }
    }
}

/// A run of consecutive connection attempts to the endpoint that failed.
#[derive(Serialize)]
struct Outage {
    /// When the first failed attempt started (seconds since the load began).
    from_s: f64,
    /// From the first failed attempt to the next accepted one (or to the
    /// end of the run, when `open`).
    ms: f64,
    /// Attempts that failed in it.
    attempts: u64,
    /// The first error.
    error: String,
    /// True when no attempt succeeded after it before the run ended.
    open: bool,
}

/// What `--probe-ms` saw: the endpoint's refusals, attempt by attempt.
#[derive(Serialize, Default)]
struct EndpointReport {
    interval_ms: u64,
    attempts: u64,
    accepted: u64,
    refused: u64,
    other_errors: u64,
    outages: Vec<Outage>,
    longest_ms: f64,
}

/// Connects to `addr` every `interval` until `stop` is set: a TCP
/// handshake only (closed at once), so an outage is measured where it
/// happens, at the port, to within one interval.
async fn probe_endpoint(
    addr: SocketAddr,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    t0: Instant,
) -> EndpointReport {
    let mut r = EndpointReport { interval_ms: interval.as_millis() as u64, ..EndpointReport::default() };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<(Instant, u64, String)> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => break,
        }
        let started = Instant::now();
        r.attempts += 1;
        let outcome =
            match tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_stream)) => Ok(()),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    r.refused += 1;
                    Err(format!("connect: {e}"))
                }
                Ok(Err(e)) => {
                    r.other_errors += 1;
                    Err(format!("connect: {e}"))
                }
                Err(_) => {
                    r.other_errors += 1;
                    Err("connect: no answer within 1s".to_owned())
                }
            };
        match (outcome, current.take()) {
            (Ok(()), None) => r.accepted += 1,
            (Ok(()), Some((from, attempts, error))) => {
                r.accepted += 1;
                r.outages.push(Outage {
                    from_s: from.duration_since(t0).as_secs_f64(),
                    ms: started.duration_since(from).as_secs_f64() * 1000.0,
                    attempts,
                    error,
                    open: false,
                });
            }
            (Err(e), None) => current = Some((started, 1, e)),
            (Err(_), Some((from, attempts, error))) => current = Some((from, attempts + 1, error)),
        }
    }
    if let Some((from, attempts, error)) = current {
        r.outages.push(Outage {
            from_s: from.duration_since(t0).as_secs_f64(),
            ms: from.elapsed().as_secs_f64() * 1000.0,
            attempts,
            error,
            open: true,
        });
    }
    r.longest_ms = r.outages.iter().map(|o| o.ms).fold(0.0, f64::max);
    r
}

async fn load(dir: &Path, args: LoadArgs) -> Result<(), String> {
    let (info, tls) = LabInfo::read(dir)?;
    let started = Instant::now();
    let mut pool = Pool::new(PoolOptions {
        addr: info.listen,
        tls: tls.clone(),
        token: Some(info.token.clone()),
        parallelism: 8,
        timeout: Duration::from_secs(10),
    });
    let opened = pool.open(args.hold).await;
    let load = match args.pace {
        Some(pace) => {
            Clients::Paced(PacedLoad::start(info.listen, tls, info.token.clone(), args.clients, pace))
        }
        None => Clients::Fast(Load::start(info.listen, tls, Some(info.token.clone()), args.clients)),
    };
    let (probe_stop, probe_rx) = tokio::sync::watch::channel(false);
    let prober = args.probe.map(|every| tokio::spawn(probe_endpoint(info.listen, every, probe_rx, started)));
    if let Some(f) = &args.started_file {
        write(f, "")?;
    }
    let deadline = Instant::now() + args.max;
    let mut stopped_by = "stop file";
    while !args.stop_file.exists() {
        if Instant::now() >= deadline {
            stopped_by = "--max-seconds";
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = probe_stop.send(true);
    let endpoint = match prober {
        Some(task) => Some(task.await.map_err(|e| format!("the endpoint probe failed: {e}"))?),
        None => None,
    };
    let report = load.stop().await;
    let held = pool.probe().await;
    // Failed requests, with their times, to tell a switch from noise.
    let failures: Vec<_> = report
        .failures
        .iter()
        .take(50)
        .map(|f| {
            json!({
                "at_s": f.started.duration_since(started).as_secs_f64(),
                "ms": f.ended.duration_since(f.started).as_secs_f64() * 1000.0,
                "error": f.error,
            })
        })
        .collect();
    // The longest time in which no new connection succeeded (between two
    // successful answers), what the clients felt of a switch.
    let mut done: Vec<Instant> = report.successes.iter().map(|s| s.started + s.took).collect();
    done.sort();
    let without_success = done.windows(2).map(|w| w[1].duration_since(w[0])).max().unwrap_or_default();
    let out = json!({
        "seconds": started.elapsed().as_secs_f64(),
        "stopped_by": stopped_by,
        "new": {
            "ok": report.ok,
            "failed": report.failed,
            "by_server": report.by_server,
            "errors": report.errors,
            "failures": failures,
            "longest_without_success_ms": without_success.as_secs_f64() * 1000.0,
        },
        "endpoint": endpoint,
        "held": {
            "wanted": args.hold,
            "opened": opened.opened,
            "open_failed": opened.failed,
            "open_errors": opened.errors,
            "ok": held.ok,
            "closed": held.closed,
            "failed": held.failed,
            "errors": held.errors,
        },
    });
    println!("{out}");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Masters { out, node_dir, masters: n, max_seconds } => {
            masters(&out, &node_dir, n, Duration::from_secs(max_seconds)).await
        }
        Command::Probe { lab } => probe(&lab).await,
        Command::Load { lab, stop_file, started_file, clients, hold, max_seconds, probe_ms, pace_ms } => {
            let max = Duration::from_secs(max_seconds);
            let probe = (probe_ms > 0).then(|| Duration::from_millis(probe_ms));
            let pace = (pace_ms > 0).then(|| Duration::from_millis(pace_ms));
            load(&lab, LoadArgs { stop_file, started_file, clients, hold, max, probe, pace }).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("node_lab: {e}");
            ExitCode::FAILURE
        }
    }
}
