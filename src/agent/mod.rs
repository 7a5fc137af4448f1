//! The agent: keeps HAProxy running the configuration that apilb.yaml
//! describes, and reports what it sees.
//!
//! ```text
//!  signals ──► Control ──┐
//!  every 1s: re-render ──┼──► apply: validate (haproxy -c) → write → reload → confirm
//!  every check interval ─┼──► poll: show proc + show stat → status, metrics, transitions
//!  HAProxy master dies ──┘──► respawn with backoff on the last good config
//! ```
//!
//! Invariants: HAProxy only ever runs a config `haproxy -c` accepted; a
//! refused change leaves the running config and the file on disk as they
//! were; the agent exiting (even SIGKILL) never stops HAProxy unless asked
//! to (Shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep, sleep_until};

mod masters;
mod observe;

use masters::effective;

use crate::discovery::{self, persist};
use crate::fsutil;
use crate::haproxy::output::Output;
use crate::haproxy::stat::ServerState;
use crate::haproxy::supervisor::{Haproxy, ReloadError, SupervisorError, alive, signal_if_ours};
use crate::haproxy::{Binary, BinaryError, Version};
use crate::http::{self, HttpState};
use crate::inputs::{Secret, Verify};
use crate::layout::Paths;
use crate::masters::{Source, Sources};
use crate::metrics::Metrics;
use crate::render::{Features, Rendered};
use crate::status::{CheckStatus, ReloadRecord, Status};
use crate::systemd;
use crate::{LoadError, Loaded};

/// How the agent is run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The YAML file; re-read on SIGHUP and whenever it changes.
    pub config_path: PathBuf,
    /// How long a graceful stop lets connections finish before HAProxy is
    /// stopped hard.
    pub shutdown_grace: Duration,
}

/// Requests to the running agent: what OS signals become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Re-read the config now and apply it if it changed (SIGHUP).
    Reload,
    /// Stop HAProxy gracefully and exit (SIGTERM, SIGINT). A second one
    /// while stopping forces the stop.
    Shutdown,
    /// Exit and leave HAProxy running for the next agent (SIGUSR2): the
    /// zero-downtime upgrade path.
    Handover,
}

/// How the agent ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// HAProxy was stopped, gracefully.
    Stopped,
    /// HAProxy was stopped hard after a second stop request.
    Forced,
    /// HAProxy was left running for the next agent.
    HandedOver,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The config or a file it names is unusable.
    #[error(transparent)]
    Config(#[from] LoadError),
    /// HAProxy refused the rendered config.
    #[error("{path}: {source}")]
    Rejected {
        /// The config file.
        path: String,
        /// HAProxy's verdict.
        #[source]
        source: BinaryError,
    },
    /// The HAProxy binary is missing or unusable.
    #[error(transparent)]
    Binary(BinaryError),
    /// A directory or file of the agent could not be prepared.
    #[error("{}: {source}", path.display())]
    Files {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics endpoint could not bind.
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// HAProxy did not start.
    #[error(transparent)]
    Start(#[from] SupervisorError),
    /// The frontend never accepted a connection.
    #[error("HAProxy runs but its frontend on {0} does not accept connections")]
    FrontendDown(SocketAddr),
    /// HAProxy could not get the file descriptors its `maxconn` needs.
    #[error("{0}")]
    FdLimit(String),
}

impl AgentError {
    /// True for errors in the configuration (exit code 2).
    pub fn is_config(&self) -> bool {
        matches!(self, AgentError::Config(_) | AgentError::Rejected { .. })
    }
}

/// A running agent.
pub struct Handle {
    control: mpsc::Sender<Control>,
    status: watch::Receiver<Status>,
    metrics_addr: SocketAddr,
    task: JoinHandle<Exit>,
}

impl Handle {
    /// Sends a request to the agent.
    pub async fn send(&self, control: Control) {
        let _ = self.control.send(control).await;
    }

    /// A sender for requests (for signal handlers).
    pub fn controller(&self) -> mpsc::Sender<Control> {
        self.control.clone()
    }

    /// The latest status; `changed()` on a clone waits for updates.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Where the HTTP endpoint listens (useful with port 0).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Stops the agent task at once, without touching HAProxy (for tests
    /// tearing down, and the equivalent of the agent being killed).
    pub fn abort(&self) {
        self.task.abort();
    }

    /// Waits until the agent exits.
    pub async fn wait(self) -> Exit {
        self.task.await.unwrap_or(Exit::Forced)
    }
}

/// The haproxy.cfg HAProxy runs, to restore it if a reload fails.
struct Running {
    /// The file's text, secrets included.
    text: Secret,
    /// Its [`Rendered::fingerprint`]: what a new render is compared with.
    fingerprint: String,
    /// Its [`Rendered::hash`], for logs.
    hash: String,
    /// Its secrets, to keep them out of HAProxy's messages.
    redactor: crate::render::Redactor,
}

impl Running {
    fn of(r: &Rendered) -> Running {
        Running {
            text: r.text.clone(),
            fingerprint: r.fingerprint.clone(),
            hash: r.hash.clone(),
            redactor: r.redactor.clone(),
        }
    }
}

/// The config in effect.
struct Applied {
    loaded: Loaded,
    at: SystemTime,
}

/// Delays between attempts to restart a dead HAProxy: the first at once.
const RESPAWN_BACKOFF: [Duration; 8] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
];

/// How long HAProxy must run before the backoff starts from zero again.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// How often the config and the files it names are re-read.
const CONFIG_POLL: Duration = Duration::from_secs(1);

struct Agent {
    opts: Options,
    paths: Paths,
    binary: Binary,
    version: Version,
    output: Output,
    haproxy: Option<Haproxy>,
    started_at: Instant,
    respawn_attempt: usize,
    respawn_at: Option<Instant>,
    workers_seen: Vec<u32>,
    applied: Applied,
    /// What HAProxy runs (may differ from `applied` only after adopting
    /// a master whose config could not be updated).
    running: Running,
    /// A changed render seen once, applied when the next read agrees.
    candidate: Option<String>,
    /// The fingerprint of the last render HAProxy refused; not retried
    /// until it changes (or on SIGHUP).
    refused_hash: Option<String>,
    /// The last config error reported, so it is logged once, not every second.
    last_error: Option<String>,
    metrics: Arc<Metrics>,
    status: Status,
    status_tx: watch::Sender<Status>,
    heartbeat: Arc<AtomicU64>,
    states: HashMap<String, ServerState>,
    check_statuses: HashMap<String, String>,
    /// Seeds, persisted and discovered masters: what the set is made of.
    sources: Sources,
    /// The discovery watcher, when configured.
    discovery: Option<JoinHandle<()>>,
    /// Its reports.
    discovery_rx: Option<mpsc::Receiver<discovery::Update>>,
    /// Removed masters still draining: name → when they are deleted
    /// whatever their sessions.
    draining: HashMap<String, Instant>,
    /// The last discovery problem logged, so it is logged once.
    last_discovery_problem: Option<String>,
    /// Masters HAProxy reports marked DOWN, as (backend, server), the
    /// moment it prints so: where HAProxy cannot be trusted to close their
    /// sessions ([`Features::shutdown_sessions_on_mark_down`]), the agent
    /// does it at once.
    marked_down: Option<mpsc::Receiver<(String, String)>>,
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Starts the agent: loads and validates the config, binds the HTTP
/// endpoint, adopts or starts HAProxy and waits until the frontend accepts
/// connections. Config errors are reported before anything is bound.
pub async fn start(opts: Options) -> Result<Handle, AgentError> {
    let (yaml, inputs) = crate::load_parts(&opts.config_path)?;
    let paths = Paths::from_config(&yaml);
    let mut sources = Sources { seeds: yaml.masters.clone(), persisted: Vec::new(), discovered: None };
    if yaml.discovery.kubernetes.is_some() {
        match persist::load(&paths.masters_file()) {
            Ok(saved) if !saved.is_empty() => {
                tracing::info!(
                    count = saved.len(),
                    "using the masters saved by the previous run as candidates too"
                );
                sources.persisted = saved;
            }
            Ok(_) => {}
            Err(warning) => tracing::warn!("{warning}; ignoring it"),
        }
    }
    let binary = Binary::new(&yaml.haproxy.binary);
    let version = binary.version().await.map_err(AgentError::Binary)?;
    let mut loaded = effective(yaml, inputs, &sources, &paths, version.features());
    let config = &loaded.config;
    crate::haproxy::ensure_fd_limit(
        crate::haproxy::fds_needed(config.haproxy.maxconn, config.masters.len()),
        config.haproxy.maxconn,
    )
    .map_err(AgentError::FdLimit)?;

    for dir in [&paths.runtime_dir, &paths.state_dir] {
        fsutil::ensure_private_dir(dir).map_err(|source| AgentError::Files { path: dir.clone(), source })?;
    }
    for (what, addr) in [("listen", config.listen.0), ("metrics.listen", config.metrics.listen.0)] {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "{what} is served off loopback, to whoever can reach this address (expose in apilb.yaml)"
            );
        }
    }
    let metrics_listener = TcpListener::bind(config.metrics.listen.0)
        .await
        .map_err(|source| AgentError::Bind { addr: config.metrics.listen.0, source })?;
    let metrics_addr = metrics_listener.local_addr().unwrap_or(config.metrics.listen.0);
    let output = Output::open(&paths.output_fifo())
        .map_err(|source| AgentError::Files { path: paths.output_fifo(), source })?;
    output.set_redactor(loaded.rendered.redactor.clone());

    let metrics = Arc::new(Metrics::new());
    for result in ["success", "invalid_config", "refused", "failed"] {
        metrics.haproxy_reloads_total.with_label_values(&[result]);
    }
    metrics.set_not_applied(None);
    for method in ["runtime", "reload"] {
        metrics.master_changes_total.with_label_values(&[method]);
    }
    metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &version.full]).set(1);

    let haproxy = match Haproxy::adopt(&paths, &version).await {
        Some(h) => {
            tracing::info!(
                pid = h.pid(),
                "adopted the running HAProxy master; the data plane was not touched"
            );
            h
        }
        None => {
            let staged = stage_and_validate(&binary, &paths, &loaded.rendered).await.map_err(|source| {
                AgentError::Rejected { path: opts.config_path.display().to_string(), source }
            })?;
            promote(&paths, &staged, &loaded.rendered)?;
            let h = Haproxy::spawn(&binary, &version, &paths, &output).await?;
            tracing::info!(pid = h.pid(), config = loaded.rendered.short_hash(), "started HAProxy");
            h
        }
    };
    // An adopted master may run another version than the binary on disk.
    let features = haproxy.version().features();
    if features != loaded.rendered.features {
        loaded = crate::assemble(loaded.config, loaded.inputs, &paths, features);
    }
    // What the master runs: the new render, unless an adopted master runs
    // something else (the config changed while no agent was running).
    let mut running = Running::of(&loaded.rendered);
    let mut stale_adoption = false;
    if haproxy.adopted() {
        let marker = std::fs::read_to_string(paths.applied_marker()).unwrap_or_default();
        if marker.trim() != loaded.rendered.fingerprint {
            stale_adoption = true;
            running.fingerprint = marker.trim().to_owned();
            running.text = Secret::new(std::fs::read_to_string(paths.config_file()).unwrap_or_default());
            running.hash = "(adopted)".to_owned();
        }
    }
    let mut applied = Applied { loaded, at: SystemTime::now() };
    // When the adopted HAProxy differs only in its servers (the previous
    // agent learned them by discovery), take its set over as it is and
    // converge through the runtime API: an agent upgrade must not reload.
    let mut sync_masters = false;
    if stale_adoption
        && let Some(current) =
            masters::running_set(running.text.expose(), &running.fingerprint, &applied.loaded, &paths)
    {
        applied.loaded = current;
        stale_adoption = false;
        sync_masters = true;
    }

    let listen = applied.loaded.config.listen.0;
    wait_for_frontend(listen, Duration::from_secs(10)).await?;

    let heartbeat = Arc::new(AtomicU64::new(http::now_ms()));
    let (status_tx, status_rx) = watch::channel(Status::default());
    let marked_down = output.marked_down_events();
    let mut agent = Agent {
        marked_down,
        paths,
        binary,
        version,
        output,
        haproxy: Some(haproxy),
        started_at: Instant::now(),
        respawn_attempt: 0,
        respawn_at: None,
        workers_seen: Vec::new(),
        applied,
        running,
        candidate: None,
        refused_hash: None,
        last_error: None,
        metrics: metrics.clone(),
        status: Status::default(),
        status_tx,
        heartbeat: heartbeat.clone(),
        states: HashMap::new(),
        check_statuses: HashMap::new(),
        sources,
        discovery: None,
        discovery_rx: None,
        draining: HashMap::new(),
        last_discovery_problem: None,
        opts,
    };
    agent.mark_applied();
    agent.restart_discovery();
    if sync_masters {
        tracing::info!(
            "the adopted HAProxy runs other masters than the candidates; aligning them at run time"
        );
        agent.apply_masters().await;
    }
    if stale_adoption {
        tracing::info!("the adopted HAProxy runs an older config than apilb.yaml describes; reloading");
        match agent.load_effective() {
            Ok(loaded) => agent.apply(loaded, "config changed while no agent was running").await,
            Err(e) => agent.refuse("invalid_config", e.to_string(), true),
        }
    }
    agent.publish_config();
    agent.poll().await;

    let interval = agent.applied.loaded.config.health.interval.std();
    let http_state = Arc::new(HttpState {
        metrics,
        status: status_rx.clone(),
        heartbeat,
        stale_after: (interval * 5).max(Duration::from_secs(10)),
    });
    let (http_stop, http_stopped) = watch::channel(false);
    tokio::spawn(http::serve(metrics_listener, http_state, async move {
        let mut rx = http_stopped;
        let _ = rx.wait_for(|s| *s).await;
    }));

    // For `apilb reload` and operators: which process is the agent.
    let pidfile = agent.paths.agent_pidfile();
    if let Err(e) = fsutil::write_atomic(&pidfile, format!("{}\n", std::process::id()).as_bytes(), 0o600) {
        tracing::warn!(error = %e, path = %pidfile.display(), "cannot write the agent's pidfile");
    }
    let (control_tx, control_rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let exit = agent.run(control_rx).await;
        let _ = http_stop.send(true);
        exit
    });
    Ok(Handle { control: control_tx, status: status_rx, metrics_addr, task })
}

/// Writes a render to the staging name and validates it with `haproxy -c`.
/// Returns the staging path.
async fn stage_and_validate(
    binary: &Binary,
    paths: &Paths,
    rendered: &Rendered,
) -> Result<PathBuf, BinaryError> {
    let staging = paths.staging_config();
    let result = binary.validate_at(rendered, paths, &staging).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    for w in result? {
        tracing::warn!(target: "haproxy", "{}", rendered.redact(&w));
    }
    Ok(staging)
}

/// Renames the validated staging file over the config HAProxy runs.
fn promote(paths: &Paths, staging: &Path, rendered: &Rendered) -> Result<(), AgentError> {
    let target = paths.config_file();
    std::fs::rename(staging, &target).map_err(|source| AgentError::Files { path: target.clone(), source })?;
    let marker = paths.applied_marker();
    fsutil::write_atomic(&marker, rendered.fingerprint.as_bytes(), 0o600)
        .map_err(|source| AgentError::Files { path: marker, source })
}

async fn wait_for_frontend(addr: SocketAddr, limit: Duration) -> Result<(), AgentError> {
    let deadline = Instant::now() + limit;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(AgentError::FrontendDown(addr));
        }
        sleep(Duration::from_millis(20)).await;
    }
}

impl Agent {
    async fn run(mut self, mut control: mpsc::Receiver<Control>) -> Exit {
        let check_interval = self.applied.loaded.config.health.interval.std().max(Duration::from_millis(200));
        let mut poll_tick = interval(check_interval);
        poll_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut config_tick = interval(CONFIG_POLL);
        config_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.heartbeat.store(http::now_ms(), Ordering::Relaxed);
            let dead = async {
                match &self.haproxy {
                    Some(h) => h.exited().await,
                    None => std::future::pending().await,
                }
            };
            let respawn = async {
                match self.respawn_at {
                    Some(at) if self.haproxy.is_none() => sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            let discovered = async {
                match self.discovery_rx.as_mut() {
                    Some(rx) => match rx.recv().await {
                        Some(u) => u,
                        None => std::future::pending().await,
                    },
                    None => std::future::pending().await,
                }
            };
            let marked_down = async {
                match self.marked_down.as_mut() {
                    Some(rx) => match rx.recv().await {
                        Some(e) => e,
                        None => std::future::pending().await,
                    },
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                (backend, server) = marked_down => {
                    if backend == crate::render::BACKEND {
                        self.close_sessions_of(&server).await;
                    }
                }
                update = discovered => self.on_discovery(update).await,
                c = control.recv() => match c.unwrap_or(Control::Shutdown) {
                    Control::Reload => self.reload_now().await,
                    Control::Handover => return self.handover(),
                    Control::Shutdown => return self.shutdown(&mut control).await,
                },
                exit = dead => self.on_haproxy_exit(exit.status),
                _ = respawn => self.respawn().await,
                _ = poll_tick.tick() => self.poll().await,
                _ = config_tick.tick() => self.watch_config().await,
            }
        }
    }

    /// What the HAProxy that runs (or, while none runs, the binary that
    /// will) handles: renders follow it, so after a reload re-executes a
    /// newer binary the next render adapts, and is applied like any change.
    fn features(&self) -> Features {
        self.haproxy.as_ref().map_or_else(|| self.version.features(), |h| h.version().features())
    }

    /// Closes the established sessions of a master marked DOWN where
    /// HAProxy's own `on-marked-down shutdown-sessions` is not rendered
    /// (HAProxy 3.0, see [`Features`]). Their clients reconnect at once,
    /// to healthy masters.
    async fn close_sessions_of(&mut self, name: &str) {
        if self.features().shutdown_sessions_on_mark_down {
            return;
        }
        let Some(h) = &self.haproxy else { return };
        match crate::haproxy::runtime::close_established(h, name).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(master = name, sessions = n, "closed the sessions of a master marked DOWN")
            }
            Err(e) => tracing::warn!(master = name, "cannot close the sessions of a master marked DOWN: {e}"),
        }
    }

    /// SIGHUP: apply the config file now, without waiting for it to settle.
    async fn reload_now(&mut self) {
        systemd::notify("RELOADING=1");
        match self.load_effective() {
            Ok(loaded) if loaded.rendered.fingerprint == self.running.fingerprint => {
                tracing::info!(
                    config = loaded.rendered.short_hash(),
                    "reload requested; the configuration is unchanged"
                );
                self.clear_error();
            }
            Ok(loaded) => self.apply(loaded, "reload requested").await,
            Err(e) => self.refuse("invalid_config", e.to_string(), true),
        }
        self.status.config.reload_requests += 1;
        self.publish_config();
        systemd::notify("READY=1");
    }

    /// Every second: re-render, and apply a change once two consecutive
    /// reads agree (so a file caught mid-write is not applied).
    async fn watch_config(&mut self) {
        match self.load_effective() {
            Ok(loaded) => {
                let hash = loaded.rendered.fingerprint.clone();
                if self.refused_hash.as_deref() == Some(&hash) {
                    self.candidate = None;
                } else if hash == self.running.fingerprint {
                    self.candidate = None;
                    if self.last_error.is_some() {
                        tracing::info!("the configuration file is back to the config in effect");
                        self.clear_error();
                    }
                } else if self.candidate.as_deref() == Some(&hash) {
                    // HAProxy runs but did not answer its last poll (frozen,
                    // overloaded): a reload would only wait for it and hold
                    // the loop up. The change is applied once it answers.
                    if self.haproxy.is_none() || self.status.haproxy.running {
                        self.candidate = None;
                        self.apply(loaded, "configuration or referenced files changed").await;
                    }
                } else {
                    self.candidate = Some(hash);
                }
            }
            Err(e) => {
                self.candidate = None;
                self.refuse("invalid_config", e.to_string(), false);
            }
        }
        self.publish_config();
    }

    /// Validates a new render, writes it and reloads HAProxy. On any
    /// failure the running config and the file on disk stay as they were.
    async fn apply(&mut self, loaded: Loaded, why: &str) {
        if let Some(msg) = crate::config::restart_only::refusal(&self.applied.loaded.config, &loaded.config) {
            self.refused_hash = Some(loaded.rendered.fingerprint.clone());
            self.refuse("invalid_config", msg, false);
            return;
        }
        let staged = match stage_and_validate(&self.binary, &self.paths, &loaded.rendered).await {
            Ok(p) => p,
            Err(e) => {
                self.refused_hash = Some(loaded.rendered.fingerprint.clone());
                let result = if matches!(e, BinaryError::Rejected { .. }) { "refused" } else { "failed" };
                self.refuse(result, format!("{}: {e}", self.opts.config_path.display()), true);
                return;
            }
        };
        self.capture_counters().await;
        let Some(haproxy) = &self.haproxy else {
            // HAProxy is down and being restarted: the next start uses the
            // new config.
            match promote(&self.paths, &staged, &loaded.rendered) {
                Ok(()) => self.accept(loaded),
                Err(e) => self.refuse("failed", e.to_string(), true),
            }
            return;
        };
        if let Err(e) = haproxy.save_server_state().await {
            // The new worker would load a stale state file (the failed
            // write leaves the old one): a master DOWN now could start UP.
            // Like any failed step, this refuses the change.
            let _ = std::fs::remove_file(&staged);
            self.refused_hash = Some(loaded.rendered.fingerprint.clone());
            self.refuse("failed", format!("cannot save the server state before the reload: {e}"), true);
            return;
        }
        if let Err(e) = promote(&self.paths, &staged, &loaded.rendered) {
            self.refuse("failed", e.to_string(), true);
            return;
        }
        self.output.set_redactor(loaded.rendered.redactor.clone());
        match haproxy.reload(&self.output).await {
            Ok(proc) => {
                tracing::info!(
                    reason = why,
                    config = loaded.rendered.short_hash(),
                    worker = proc.workers.first().map(|w| w.pid),
                    old_workers = proc.old_workers.len(),
                    "reloaded HAProxy"
                );
                self.accept(loaded);
            }
            Err(e) => {
                // Put the last good config back, so a restart of HAProxy
                // does not pick up the one it refused.
                let restored = fsutil::write_atomic(
                    &self.paths.config_file(),
                    self.running.text.expose().as_bytes(),
                    0o600,
                )
                .and_then(|()| {
                    fsutil::write_atomic(
                        &self.paths.applied_marker(),
                        self.running.fingerprint.as_bytes(),
                        0o600,
                    )
                });
                if let Err(re) = restored {
                    tracing::error!(error = %re, "cannot restore the previous haproxy.cfg");
                }
                self.output.set_redactor(self.running.redactor.clone());
                // A busy master refused nothing, and one that did not
                // answer (frozen, overloaded) said nothing about the
                // config: the change is retried (once it answers again,
                // see watch_config) and stays reported until applied. A
                // refused or unconfirmed one waits for the next change.
                let unanswered = matches!(e, ReloadError::Supervisor(_));
                if !matches!(e, ReloadError::Busy) && !unanswered {
                    self.refused_hash = Some(loaded.rendered.fingerprint.clone());
                }
                let result = match e {
                    ReloadError::Refused { .. } => "refused",
                    _ => "failed",
                };
                self.refuse(result, e.to_string(), !unanswered);
            }
        }
    }

    fn accept(&mut self, loaded: Loaded) {
        let old = &self.applied.loaded.config;
        let discovery_changed = old.discovery != loaded.config.discovery
            || old.listen != loaded.config.listen
            || old.health.tls.server_name() != loaded.config.health.tls.server_name();
        self.running = Running::of(&loaded.rendered);
        self.refused_hash = None;
        self.applied = Applied { loaded, at: SystemTime::now() };
        self.mark_applied();
        self.metrics.haproxy_reloads_total.with_label_values(&["success"]).inc();
        self.status.config.last_reload =
            Some(ReloadRecord { at: unix_now(), result: "success".into(), message: None });
        self.clear_error();
        self.remove_unused_files();
        if discovery_changed {
            self.restart_discovery();
        }
    }

    /// Records the config in effect in metrics and status.
    fn mark_applied(&mut self) {
        let a = &self.applied;
        let at = a.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let settings = a.loaded.config.settings_hash();
        self.status.listen = a.loaded.config.listen.to_string();
        // One series: the config in effect, not every config ever applied.
        self.metrics.config_info.reset();
        self.metrics.config_info.with_label_values(&[&a.loaded.rendered.hash, &settings]).set(1);
        self.status.config.settings_hash = settings;
        self.metrics.config_last_apply_timestamp_seconds.set(at);
        self.status.config.hash = a.loaded.rendered.hash.clone();
        self.status.config.applied_at = Some(at);
        let check = &a.loaded.inputs.check;
        self.metrics.check_auth_info.reset();
        let verified = matches!(check.verify, Verify::Ca { .. });
        self.metrics
            .check_auth_info
            .with_label_values(&[check.mode_in_use(), if verified { "true" } else { "false" }])
            .set(1);
        self.metrics.check_bootstrap.set(i64::from(check.bootstrap));
        if check.bootstrap {
            tracing::warn!(
                "bootstrap: no usable credential for the /readyz check yet, so 401/403 count as \
                 \"alive, readiness unknown\"; apilb switches to authenticated checks when one appears"
            );
        } else if self.status.check.auth == "bootstrap" {
            tracing::info!(
                credential = check.mode_in_use(),
                source = %check.source,
                verified,
                "bootstrap over: the /readyz check now presents the node's credential; 401/403 count as failures"
            );
        }
        self.status.check =
            CheckStatus { auth: check.mode_in_use().into(), source: check.source.clone(), verified };
        let masters = &a.loaded.config.masters;
        self.metrics.masters_configured.set(masters.len() as i64);
        let known: Vec<String> = masters.iter().map(|m| m.name.clone()).collect();
        for gone in self.states.keys().filter(|n| !known.contains(n)).cloned().collect::<Vec<_>>() {
            let last_check = self.check_statuses.remove(&gone);
            self.metrics.forget_master(&gone, last_check.as_deref());
            self.states.remove(&gone);
        }
        self.metrics.master_info.reset();
        let mut by_source: HashMap<Source, i64> = HashMap::new();
        for m in masters {
            let source = self.sources.source_of(m);
            *by_source.entry(source).or_default() += 1;
            self.metrics
                .master_info
                .with_label_values(&[&m.name, &m.address.to_string(), source.as_str()])
                .set(1);
            self.metrics.init_master(&m.name);
        }
        for s in Source::ALL {
            self.metrics
                .masters_by_source
                .with_label_values(&[s.as_str()])
                .set(by_source.get(&s).copied().unwrap_or(0));
        }
        // Keep what discovery taught us for the next start.
        if self.sources.discovered.is_some()
            && a.loaded.config.discovery.kubernetes.is_some()
            && let Err(e) = persist::save(&self.paths.masters_file(), masters)
        {
            tracing::warn!(error = %e, "cannot save the master set; the next start uses the seeds only");
        }
    }

    fn clear_error(&mut self) {
        self.last_error = None;
        self.status.config.pending_error = None;
        self.metrics.set_not_applied(None);
    }

    /// Reports a refused change: logged and counted once per distinct
    /// error; `apilb_config_not_applied` and the status say it lasts until
    /// the file is applied or back to the config in effect.
    fn refuse(&mut self, result: &str, message: String, always: bool) {
        if !always && self.last_error.as_deref() == Some(&message) {
            return;
        }
        tracing::error!(
            result,
            running = &self.running.hash[..self.running.hash.len().min(12)],
            "configuration change not applied; HAProxy keeps the config in effect: {message}"
        );
        self.metrics.haproxy_reloads_total.with_label_values(&[result]).inc();
        self.metrics.set_not_applied(Some(result));
        self.status.config.last_reload =
            Some(ReloadRecord { at: unix_now(), result: result.into(), message: Some(message.clone()) });
        self.status.config.pending_error = Some(message.clone());
        self.last_error = Some(message);
    }

    /// Deletes client bundles and CA copies that no config in effect
    /// refers to.
    fn remove_unused_files(&self) {
        let keep: Vec<PathBuf> =
            self.applied.loaded.rendered.aux_files.iter().map(|a| a.path.clone()).collect();
        let Ok(entries) = std::fs::read_dir(&self.paths.runtime_dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if Paths::is_check_file(&name) && !keep.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn on_haproxy_exit(&mut self, status: String) {
        let ran = self.started_at.elapsed();
        self.haproxy = None;
        self.metrics.haproxy_up.set(0);
        self.status.haproxy.running = false;
        self.status.haproxy.frontend_open = false;
        if ran >= STABLE_AFTER {
            self.respawn_attempt = 0;
        }
        let delay = RESPAWN_BACKOFF[self.respawn_attempt.min(RESPAWN_BACKOFF.len() - 1)];
        tracing::error!(%status, retry_in = ?delay, "HAProxy exited unexpectedly; restarting it on the last good config");
        self.respawn_at = Some(Instant::now() + delay);
        self.publish();
    }

    async fn respawn(&mut self) {
        self.respawn_at = None;
        self.respawn_attempt += 1;
        // The dead master's workers exit within milliseconds; wait for
        // them so the new master can bind the port. The pids are from the
        // last poll: only processes that still run our HAProxy count, and
        // only those are signalled.
        let ours = |pid: &u32| alive(*pid) && crate::haproxy::supervisor::is_ours(*pid, &self.paths);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.workers_seen.iter().any(ours) && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        for pid in std::mem::take(&mut self.workers_seen) {
            if signal_if_ours(pid, &self.paths, nix::sys::signal::Signal::SIGTERM) {
                tracing::warn!(pid, "terminated a worker orphaned by the dead master");
            }
        }
        match Haproxy::spawn(&self.binary, &self.version, &self.paths, &self.output).await {
            Ok(h) => {
                tracing::info!(pid = h.pid(), "HAProxy restarted");
                self.metrics.haproxy_restarts_total.inc();
                self.status.haproxy.restarts += 1;
                self.started_at = Instant::now();
                self.haproxy = Some(h);
                self.poll().await;
            }
            Err(e) => {
                let delay = RESPAWN_BACKOFF[self.respawn_attempt.min(RESPAWN_BACKOFF.len() - 1)];
                tracing::error!(error = %e, retry_in = ?delay, "cannot restart HAProxy");
                self.respawn_at = Some(Instant::now() + delay);
            }
        }
    }

    fn publish_config(&mut self) {
        self.status.config.path = self.opts.config_path.display().to_string();
        self.publish();
    }

    /// Sends the status to watchers and systemd when it changed.
    fn publish(&mut self) {
        self.status.version = env!("CARGO_PKG_VERSION").into();
        let previous = self.status_tx.borrow().summary();
        let summary = self.status.summary();
        if summary != previous {
            systemd::notify(&format!("STATUS={summary}"));
        }
        self.status_tx.send_replace(self.status.clone());
    }

    fn handover(mut self) -> Exit {
        self.stop_discovery();
        let pid = self.haproxy.as_ref().map(Haproxy::pid);
        tracing::info!(?pid, "handing over: exiting and leaving HAProxy running for the next agent to adopt");
        Exit::HandedOver
    }

    async fn shutdown(mut self, control: &mut mpsc::Receiver<Control>) -> Exit {
        systemd::notify("STOPPING=1");
        self.stop_discovery();
        let Some(h) = self.haproxy.take() else {
            return Exit::Stopped;
        };
        let grace = self.opts.shutdown_grace;
        tracing::info!(pid = h.pid(), ?grace, "stopping HAProxy gracefully; signal again to force");
        tokio::select! {
            exit = h.stop(grace) => {
                tracing::info!(status = %exit.status, "HAProxy stopped");
                Exit::Stopped
            }
            Some(_) = control.recv() => {
                tracing::warn!("second stop request: stopping HAProxy now");
                h.signal(nix::sys::signal::Signal::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(3), h.exited()).await.is_err() {
                    h.signal(nix::sys::signal::Signal::SIGKILL);
                }
                let _ = std::fs::remove_file(self.paths.pidfile());
                Exit::Forced
            }
        }
    }
}
