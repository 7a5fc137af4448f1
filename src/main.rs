//! The `apilb` command line. Only argument parsing, logging set-up, signal
//! wiring and exit codes live here; the work is done by the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use apilb::agent::{self, Control, Exit};
use apilb::config::{CONFIG_ENV, Config, DEFAULT_CONFIG_PATH};
use apilb::haproxy::{Binary, BinaryError};
use apilb::layout::Paths;
use apilb::render::Features;
use apilb::status_client;
use clap::{Parser, Subcommand, ValueEnum};
use tokio::signal::unix::{SignalKind, signal};

/// Exit code for an unusable configuration (YAML, a file it names, or
/// HAProxy's verdict on the rendered config).
const EXIT_CONFIG: u8 = 2;
/// Exit code for any other failure.
const EXIT_FAILURE: u8 = 1;

/// apilb keeps a local, health-checked endpoint for the Kubernetes API on
/// every node: HAProxy on 127.0.0.1:16443 spreads connections over all API
/// servers and moves them away from any server whose /readyz fails.
#[derive(Parser, Debug)]
#[command(name = "apilb", version, about, long_about = None)]
#[command(after_help = "Exit codes: 0 success, 1 failure, 2 invalid configuration.")]
struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, env = CONFIG_ENV, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: start (or adopt) HAProxy and keep it in line with the
    /// configuration.
    ///
    /// The config is validated before anything starts. Changes to the file
    /// (and to the CA and credential files it names) are applied by a
    /// validated, hitless reload; an invalid change is refused and the
    /// running config keeps serving. Signals: HUP reloads now; TERM or INT
    /// stops HAProxy gracefully (a second one forces it); USR2 exits and
    /// leaves HAProxy running for the next agent (binary upgrades).
    Run {
        /// How long a graceful stop lets connections finish.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        shutdown_grace: Duration,
    },
    /// Run the health check from here, step by step, and explain failures.
    ///
    /// Uses the same CA, server name and credential as HAProxy's check.
    /// Prints the TCP connect time, the TLS handshake and the server
    /// certificate (subject, names, expiry), the HTTP status, the
    /// /readyz?verbose output on failure, and a diagnosis in plain words.
    /// Exits 1 if any master fails.
    Probe {
        /// Masters to probe, by name or address (default: all).
        masters: Vec<String>,
    },
    /// Show what the running agent sees: masters, checks, HAProxy, config.
    Status {
        /// Print the raw JSON (for scripts).
        #[arg(long)]
        json: bool,
        /// The agent's metrics address (default: metrics.listen from the
        /// config, or 127.0.0.1:9716 when the config is not readable).
        #[arg(long)]
        address: Option<std::net::SocketAddr>,
    },
    /// Apply the configuration to the running agent and wait for the
    /// outcome (systemd's ExecReload).
    ///
    /// Validates like `check`, sends SIGHUP to the agent, then waits until
    /// the agent runs the new config or reports why it did not. Unlike a
    /// bare `kill -HUP`, a refused change makes this command (and
    /// `systemctl reload`) fail with the reason.
    Reload {
        /// The agent's pid (default: from <runtime_dir>/apilb.pid).
        #[arg(long)]
        pid: Option<i32>,
        /// How long to wait for the outcome.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Print the haproxy.cfg apilb would run for the configuration.
    ///
    /// Secrets (the check's bearer token, the stats password) are replaced by
    /// <redacted> unless --show-secrets is given. Nothing is started or
    /// written except --output.
    Render {
        /// Write the config to this file (mode 0600) instead of stdout.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
        /// Print or write the secrets instead of <redacted>.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `apilb man | man -l -`.
    Man {
        /// Write apilb.1, one page per subcommand (apilb-run.1, …) and the
        /// configuration file's, apilb.yaml.5, here.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Validate the configuration without touching anything that runs.
    ///
    /// Parses the YAML, reads the files it names (CA, credentials,
    /// password), renders haproxy.cfg and has `haproxy -c` check it in a
    /// scratch directory. Suitable for Ansible's `validate:` and systemd's
    /// ExecReload.
    Check,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<apilb::config::Duration>().map(|d| d.std())
}

fn init_logging(format: LogFormat, default_filter: &str) {
    apilb::logging::init(format == LogFormat::Json, default_filter);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apilb: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(dispatch(cli));
    // A task stuck in a blocking call would otherwise keep the process
    // alive after everything else has stopped.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("apilb: {message}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn config_error(e: impl std::fmt::Display) -> Failure {
    (EXIT_CONFIG, e.to_string())
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run { shutdown_grace } => {
            init_logging(cli.log_format, "info");
            run(agent::Options { config_path: cli.config, shutdown_grace }).await
        }
        Command::Status { json, address } => status(&cli.config, json, address).await,
        Command::Reload { pid, timeout } => reload(&cli.config, pid, timeout).await,
        Command::Probe { masters } => probe(&cli.config, &masters).await,
        Command::Render { output, show_secrets } => render(&cli.config, output, show_secrets).await,
        Command::Check => check(&cli.config).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "apilb", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out_dir } => man(out_dir),
    }
}

/// `apilb probe`: the check, step by step, against each master (or those
/// named).
async fn probe(config: &Path, masters: &[String]) -> Result<(), Failure> {
    // The probe uses the check's settings only, never the HAProxy lines.
    let loaded = apilb::load(config, None, Features::default()).map_err(config_error)?;
    for note in &loaded.inputs.check.notes {
        println!("note: {note}");
    }
    let reports = apilb::probe::probe_all(&loaded.config, &loaded.inputs, masters)
        .await
        .map_err(|e| (EXIT_CONFIG, e))?;
    for r in &reports {
        println!("{}", apilb::probe::render(r));
    }
    let failed = reports.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        return Err((EXIT_FAILURE, format!("{failed} of {} masters failed the check", reports.len())));
    }
    Ok(())
}

/// `apilb render`: the haproxy.cfg the config gives, for the installed
/// HAProxy, secrets redacted unless asked.
async fn render(config_path: &Path, output: Option<PathBuf>, show_secrets: bool) -> Result<(), Failure> {
    let (config, inputs) = apilb::load_parts(config_path).map_err(config_error)?;
    // A few lines depend on the HAProxy version that will run them.
    let features = match Binary::new(&config.haproxy.binary).version().await {
        Ok(v) => v.features(),
        Err(e) => {
            eprintln!("note: {e}; rendering for HAProxy 2.6");
            Features::default()
        }
    };
    let paths = Paths::from_config(&config);
    let loaded = apilb::assemble(config, inputs, &paths, features);
    let text =
        if show_secrets { loaded.rendered.text.expose().to_owned() } else { loaded.rendered.redacted() };
    match output {
        Some(path) => apilb::fsutil::write_atomic(&path, text.as_bytes(), 0o600)
            .map_err(|e| (EXIT_FAILURE, format!("cannot write {}: {e}", path.display())))?,
        None => print!("{text}"),
    }
    for aux in &loaded.rendered.aux_files {
        eprintln!(
            "note: the config refers to {}, which `apilb run` writes before starting HAProxy",
            aux.path.display()
        );
    }
    Ok(())
}

/// `apilb man`: the manual pages, to a directory or stdout.
fn man(out_dir: Option<PathBuf>) -> Result<(), Failure> {
    let cmd = <Cli as clap::CommandFactory>::command();
    let fail = |e: std::io::Error| (EXIT_FAILURE, format!("cannot write the manual pages: {e}"));
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(fail)?;
            clap_mangen::generate_to(cmd, &dir).map_err(fail)?;
            let page = apilb::manual::config_page(env!("CARGO_PKG_VERSION"));
            std::fs::write(dir.join("apilb.yaml.5"), page).map_err(fail)
        }
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()).map_err(fail),
    }
}

/// The agent holds the node's credential: no core dump of it, and no
/// reading of its memory by another process of the same user (ptrace,
/// /proc/PID/mem). systemd's LimitCORE=0 covers HAProxy too.
fn forbid_core_dumps() {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) only changes this process's flag.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot mark the agent non-dumpable");
    }
}

async fn run(options: agent::Options) -> Result<(), Failure> {
    forbid_core_dumps();
    // Registered before anything starts, so a signal during start-up (or
    // right after READY=1) is handled, not fatal.
    let (Ok(mut hup), Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined2()),
    ) else {
        return Err((EXIT_FAILURE, "cannot install signal handlers".into()));
    };
    let handle = agent::start(options).await.map_err(|e| {
        let code = if e.is_config() { EXIT_CONFIG } else { EXIT_FAILURE };
        tracing::error!("{e}");
        (code, e.to_string())
    })?;
    apilb::systemd::notify("READY=1");
    tracing::info!(metrics = %handle.metrics_addr(), "apilb is ready");

    let control = handle.controller();
    let signals = tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = hup.recv() => Control::Reload,
                _ = term.recv() => Control::Shutdown,
                _ = int.recv() => Control::Shutdown,
                _ = usr2.recv() => Control::Handover,
            };
            if control.send(c).await.is_err() {
                return;
            }
        }
    });
    let exit = handle.wait().await;
    signals.abort();
    match exit {
        Exit::Stopped | Exit::HandedOver => Ok(()),
        Exit::Forced => Err((EXIT_FAILURE, "stopped HAProxy forcibly".into())),
    }
}

async fn status(path: &Path, json: bool, address: Option<std::net::SocketAddr>) -> Result<(), Failure> {
    let addr = match address {
        Some(a) => a,
        None => match Config::load(path) {
            Ok(config) => status_client::target(config.metrics.listen.0),
            // The config is root-only (0640): fall back to the default
            // address rather than demand root for a read-only view.
            Err(apilb::config::ConfigError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                let default = apilb::config::Metrics::default().listen.0;
                eprintln!(
                    "note: cannot read {} ({source}); asking {default} (use --address to choose)",
                    path.display()
                );
                default
            }
            // An invalid file is when the status matters most: the agent
            // keeps the last good config and reports why it refuses this
            // one. Find the agent through metrics.listen alone.
            Err(e) => {
                let addr =
                    metrics_listen_of(path).unwrap_or_else(|| apilb::config::Metrics::default().listen.0);
                let addr = status_client::target(addr);
                eprintln!("note: {e}; asking the agent at {addr} (use --address to choose)");
                addr
            }
        },
    };
    let s = status_client::fetch(addr).await.map_err(|e| (EXIT_FAILURE, e.to_string()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    } else {
        print!("{}", status_client::render_table(&s));
    }
    Ok(())
}

/// `metrics.listen` of a config file that does not load as a whole.
fn metrics_listen_of(path: &Path) -> Option<std::net::SocketAddr> {
    let yaml: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    yaml.get("metrics")?.get("listen")?.as_str()?.parse().ok()
}

async fn reload(path: &Path, pid: Option<i32>, timeout: Duration) -> Result<(), Failure> {
    check(path).await?;
    let config = Config::load(path).map_err(config_error)?;
    let addr = status_client::target(config.metrics.listen.0);
    let before = status_client::fetch(addr).await.map_err(|e| (EXIT_FAILURE, e.to_string()))?;
    let pid = match pid {
        Some(p) => p,
        None => {
            let file = Paths::from_config(&config).agent_pidfile();
            std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
                (EXIT_FAILURE, format!("cannot read the agent's pid from {}; pass --pid", file.display()))
            })?
        }
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP)
        .map_err(|e| (EXIT_FAILURE, format!("cannot signal the agent (pid {pid}): {e}")))?;
    // The agent counts the requests it has handled; its verdict is then in
    // pending_error. (HAProxy's config also holds what discovery learned, so
    // it cannot be predicted from apilb.yaml alone.)
    let sent = std::time::Instant::now();
    loop {
        // A local HTTP request: cheap enough to ask often.
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = status_client::fetch(addr).await.map_err(|e| (EXIT_FAILURE, e.to_string()))?;
        if now.config.reload_requests > before.config.reload_requests {
            return match &now.config.pending_error {
                None => {
                    let hash = now.config.hash.get(..12).unwrap_or(&now.config.hash);
                    println!("applied: HAProxy runs config sha256:{hash}");
                    Ok(())
                }
                Some(err) => Err((
                    EXIT_FAILURE,
                    format!("the agent did not apply the change (HAProxy keeps the config in effect): {err}"),
                )),
            };
        }
        if sent.elapsed() > timeout {
            return Err((
                EXIT_FAILURE,
                format!("the agent did not answer the reload request within {timeout:?}"),
            ));
        }
    }
}

async fn check(path: &Path) -> Result<(), Failure> {
    let scratch = tempfile::Builder::new()
        .prefix("apilb-check-")
        .tempdir()
        .map_err(|e| (EXIT_FAILURE, format!("cannot create a scratch directory: {e}")))?;
    let paths = Paths::under(scratch.path());
    let (config, inputs) = apilb::load_parts(path).map_err(config_error)?;
    let binary = Binary::new(&config.haproxy.binary);
    let version = binary.version().await.map_err(|e| (EXIT_FAILURE, e.to_string()))?;
    // The hash the agent reports: rendered with the config's own paths.
    // (The file validated below has scratch paths, so it differs.)
    let hash =
        apilb::assemble(config.clone(), inputs.clone(), &Paths::from_config(&config), version.features())
            .rendered
            .short_hash()
            .to_owned();
    let kubeconfig_note = check_discovery_kubeconfig(&config)?;
    let loaded = apilb::assemble(config, inputs, &paths, version.features());
    let warnings =
        binary.validate_at(&loaded.rendered, &paths, &paths.config_file()).await.map_err(|e| match e {
            BinaryError::Rejected { .. } => (EXIT_CONFIG, format!("{}: {e}", path.display())),
            other => (EXIT_FAILURE, other.to_string()),
        })?;
    for w in warnings {
        println!("haproxy warning: {w}");
    }
    for note in loaded.inputs.check.notes.iter().chain(&kubeconfig_note) {
        println!("note: {note}");
    }
    let c = &loaded.config;
    if let Err(e) = apilb::haproxy::ensure_fd_limit(
        apilb::haproxy::fds_needed(c.haproxy.maxconn, c.masters.len()),
        c.haproxy.maxconn,
    ) {
        println!("note: in this environment (not necessarily the agent's): {e}");
    }
    if c.discovery.kubernetes.is_some() {
        println!("note: with discovery the agent's master set, and so its config hash, follow the cluster");
    }
    println!(
        "{}: valid ({} masters, check {} {} with credential {}, HAProxy {}, config sha256:{})",
        path.display(),
        c.masters.len(),
        c.health.path,
        match loaded.inputs.check.verify {
            apilb::inputs::Verify::Ca { .. } => "verified",
            _ => "unverified",
        },
        loaded.inputs.check.mode_in_use(),
        version.full,
        hash,
    );
    Ok(())
}

/// Reads discovery's kubeconfig, as the agent will. One that does not exist
/// yet is a note, not an error: on a node that has not joined, it appears
/// with the join (the agent uses the static masters until then). One that
/// exists but cannot be used is a configuration error.
fn check_discovery_kubeconfig(config: &apilb::config::Config) -> Result<Option<String>, Failure> {
    let Some(settings) = &config.discovery.kubernetes else {
        return Ok(None);
    };
    let path = match apilb::discovery::kubeconfig_path(settings) {
        Ok(p) => p,
        Err(e) => {
            return Ok(Some(format!("discovery: {e}; the agent uses the static masters until one exists")));
        }
    };
    if !path.exists() {
        return Ok(Some(format!(
            "discovery.kubernetes.kubeconfig {} does not exist (yet); the agent uses the static masters until \
             it does",
            path.display()
        )));
    }
    let access = apilb::discovery::kubeconfig::load(&path)
        .map_err(|e| (EXIT_CONFIG, format!("discovery.kubernetes.kubeconfig: {e}")))?;
    if access.insecure {
        return Ok(Some(format!(
            "discovery.kubernetes.kubeconfig {} says insecure-skip-tls-verify: discovery will not verify the API \
             server's certificate",
            path.display()
        )));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agent_is_not_dumpable() {
        super::forbid_core_dumps();
        // SAFETY: reads this process's flag.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
