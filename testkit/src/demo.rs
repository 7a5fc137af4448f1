//! `apilb-demo` (`scripts/demo`): the whole product on one machine, in one
//! command.
//!
//! Three test API servers speaking real TLS (CA generated on the fly,
//! anonymous auth off like k3s) and the real agent and HAProxy in front of
//! them on 127.0.0.1:16443 (or a free port), checking `/readyz` with a
//! verified client certificate. The user breaks masters from the prompt and
//! watches the failover; Ctrl-C stops everything and removes every file.

use std::io::Write;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use crate::lab::{Lab, LabAuth, LabOptions};
use apilb::agent::{self, Control};
use apilb::haproxy::Binary;
use apilb::status::Status;
use apilb::status_client;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// HAProxy is not installed.
    #[error(
        "the demo needs HAProxy 2.6 or later: {0} (on Debian/Ubuntu: sudo apt-get install haproxy, or run scripts/ensure-deps)"
    )]
    Haproxy(#[source] apilb::haproxy::BinaryError),
    /// The test servers could not start.
    #[error("cannot start the test API servers: {0}")]
    Lab(#[from] crate::testapi::TestApiError),
    /// The agent could not start.
    #[error("cannot start the agent: {0}")]
    Agent(#[from] agent::AgentError),
}

const HELP: &str = "\
Commands (type one, then Enter):
  crash N    master N dies: connections refused      restart N   bring it back
  hang N     master N stops answering (like SIGSTOP)  resume N    let it answer again
  fail N     master N's /readyz answers 503          heal N      /readyz answers 200 again
  status     show the table                          quit        stop everything (or Ctrl-C)";

/// Runs the demo until Ctrl-C, SIGTERM or `quit`.
pub async fn run(binary: &str) -> Result<(), DemoError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered once, before anything starts, so no Ctrl-C is lost.
    let mut interrupt = signal(SignalKind::interrupt()).map_err(crate::testapi::TestApiError::Io)?;
    let mut term = signal(SignalKind::terminate()).map_err(crate::testapi::TestApiError::Io)?;
    Binary::new(binary).version().await.map_err(DemoError::Haproxy)?;
    let lab = Lab::start(LabOptions {
        masters: 3,
        auth: LabAuth::ClientCert,
        listen_port: Some(16443),
        metrics_port: Some(9716),
        cluster: None,
    })
    .await?;
    let yaml = lab.config_yaml(&format!("  binary: {binary}\n"));
    lab.write_config(&yaml).map_err(crate::testapi::TestApiError::Io)?;
    let handle = agent::start(agent::Options {
        config_path: lab.config_path(),
        shutdown_grace: Duration::from_secs(2),
    })
    .await?;
    let exe = apilb_command();
    let d = lab.dir.path().display();
    println!(
        "\napilb demo: three test API servers (real TLS, anonymous auth off) behind HAProxy,\n\
         checked on /readyz with a verified client certificate.\n\n\
         \x20 local endpoint  https://{listen}   (what the node's kubelet would use)\n\
         \x20 masters         {masters}\n\
         \x20 config          {d}/apilb.yaml\n\
         \x20 metrics         http://{metrics}/metrics\n\n\
         In another terminal:\n\
         \x20 curl --cacert {d}/ca.crt -H 'Authorization: Bearer {token}' https://{listen}/version\n\
         \x20 {exe} status --config {d}/apilb.yaml\n\
         \x20 curl -s http://{metrics}/metrics | grep -E '^apilb_master_(up|state)'\n\n\
         {HELP}\n",
        listen = lab.listen,
        masters =
            lab.servers.iter().map(|s| format!("{} {}", s.name(), s.addr())).collect::<Vec<_>>().join(", "),
        metrics = handle.metrics_addr(),
        token = lab.token,
    );

    // Show the table whenever a master changes state.
    let mut status = handle.status();
    let watcher = tokio::spawn(async move {
        let mut last = String::new();
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            let states = fingerprint(&s);
            if states != last {
                last = states;
                print_table(&s);
            }
        }
    });

    let (lines_tx, mut lines) = mpsc::channel::<String>(8);
    tokio::spawn(async move {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if lines_tx.send(line).await.is_err() {
                break;
            }
        }
    });
    prompt();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = term.recv() => break,
            line = lines.recv(), if stdin_open => match line {
                Some(line) => {
                    if !command(&lab, &handle, line.trim()).await {
                        break;
                    }
                    prompt();
                }
                // No terminal (stdin closed): keep running until a signal.
                None => stdin_open = false,
            },
        }
    }
    println!("\nstopping HAProxy and the test servers…");
    watcher.abort();
    handle.send(Control::Shutdown).await;
    let exit = handle.wait().await;
    let dir = lab.dir.path().display().to_string();
    drop(lab);
    println!("stopped ({exit:?}); removed {dir}");
    Ok(())
}

/// How to run `apilb` in another terminal: the binary built beside this
/// one (`scripts/demo` builds both), else `apilb` from the PATH.
fn apilb_command() -> String {
    std::env::current_exe()
        .ok()
        .map(|p| p.with_file_name("apilb"))
        .filter(|p| p.is_file())
        .map_or_else(|| "apilb".into(), |p| p.display().to_string())
}

fn prompt() {
    print!("demo> ");
    let _ = std::io::stdout().flush();
}

fn fingerprint(s: &Status) -> String {
    // State changes, and the first real check result of each master.
    s.masters.iter().map(|m| format!("{}={}/{} ", m.name, m.state, m.check_status == "INI")).collect()
}

fn print_table(s: &Status) {
    println!("\n{}", status_client::render_table(s));
    prompt();
}

/// Runs one prompt command; false means quit.
async fn command(lab: &Lab, handle: &agent::Handle, line: &str) -> bool {
    let mut words = line.split_whitespace();
    let (verb, arg) = (words.next().unwrap_or(""), words.next());
    let server = arg
        .and_then(|n| n.trim_start_matches("master-").parse::<usize>().ok())
        .and_then(|n| n.checked_sub(1))
        .and_then(|i| lab.servers.get(i));
    match (verb, server) {
        ("", _) => {}
        ("quit" | "exit" | "q", _) => return false,
        ("status" | "s", _) => print_table(&handle.status().borrow()),
        ("help" | "h" | "?", _) => println!("{HELP}"),
        ("crash", Some(s)) => {
            s.crash();
            println!(
                "{} crashed: connections are refused. HAProxy retries them on another master at once.",
                s.name()
            );
        }
        ("restart", Some(s)) => match s.restart().await {
            Ok(()) => println!("{} is back; it rejoins after `rise` good checks.", s.name()),
            Err(e) => println!("cannot restart {}: {e}", s.name()),
        },
        ("hang", Some(s)) => {
            s.hang();
            println!(
                "{} hangs: TCP connects, nothing answers. Checks time out; its sessions are closed at mark-down.",
                s.name()
            );
        }
        ("resume", Some(s)) => {
            s.resume();
            println!("{} answers again.", s.name());
        }
        ("fail", Some(s)) => {
            s.set_readyz(503);
            println!(
                "{}'s /readyz answers 503 (etcd trouble or shutting down): out of rotation after `fall` checks.",
                s.name()
            );
        }
        ("heal", Some(s)) => {
            s.set_readyz(200);
            println!("{}'s /readyz answers 200 again.", s.name());
        }
        (_, None) if ["crash", "restart", "hang", "resume", "fail", "heal"].contains(&verb) => {
            println!("which master? e.g. `{verb} 2` (1-{})", lab.servers.len());
        }
        _ => println!("unknown command {line:?}\n{HELP}"),
    }
    true
}
