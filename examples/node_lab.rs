//! The host side of `scripts/test-systemd` (the systemd node lab). Not part
//! of the shipped binary: a thin user of `apilb::lab` and `apilb::testapi`.
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
//! node_lab load --lab DIR --stop-file FILE [--clients 2] [--hold 40]
//!     Opens --hold long-lived connections, then keeps --clients clients
//!     opening a new connection per request until FILE exists (or
//!     --max-seconds), then asks every held connection once more. Prints
//!     the counts as JSON on stdout.
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apilb::lab::{Lab, LabAuth, LabOptions};
use apilb::testapi::pool::{Pool, PoolOptions};
use apilb::testapi::{ApiServer, Load, Session};
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
        let tls = apilb::testapi::client_tls(&ca, None).map_err(|e| e.to_string())?;
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
    let load = Load::start(info.listen, tls, Some(info.token.clone()), args.clients);
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
    let report = load.stop().await;
    let held = pool.probe().await;
    let out = json!({
        "seconds": started.elapsed().as_secs_f64(),
        "stopped_by": stopped_by,
        "new": {
            "ok": report.ok,
            "failed": report.failed,
            "by_server": report.by_server,
            "errors": report.errors,
        },
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
        Command::Load { lab, stop_file, started_file, clients, hold, max_seconds } => {
            let max = Duration::from_secs(max_seconds);
            load(&lab, LoadArgs { stop_file, started_file, clients, hold, max }).await
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
