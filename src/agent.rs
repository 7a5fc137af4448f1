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

use crate::discovery::{self, persist};
use crate::fsutil;
use crate::haproxy::output::Output;
use crate::haproxy::runtime;
use crate::haproxy::stat::{ServerState, Stats};
use crate::haproxy::supervisor::{Haproxy, ReloadError, SupervisorError, alive};
use crate::haproxy::{Binary, BinaryError, Version};
use crate::http::{self, HttpState};
use crate::inputs::Verify;
use crate::masters::{Source, Sources};
use crate::metrics::{Metrics, ServerCounters};
use crate::render::{CheckPlan, FALLBACK_SUFFIX, Paths, Rendered};
use crate::status::{CheckStatus, DiscoveryStatus, MasterStatus, ReloadRecord, Status};
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
    text: String,
    hash: String,
    redactor: crate::render::Redactor,
}

impl Running {
    fn of(r: &Rendered) -> Running {
        Running { text: r.text.clone(), hash: r.hash.clone(), redactor: r.redactor.clone() }
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
    /// The last render HAProxy refused; not retried until it changes (or
    /// on SIGHUP).
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
}

/// The config with the masters of the current policy (see `masters`).
fn effective(
    mut config: crate::config::Config,
    inputs: crate::inputs::Inputs,
    sources: &Sources,
    paths: &Paths,
) -> Loaded {
    config.masters = sources.desired();
    crate::assemble(config, inputs, paths)
}

/// True when two renders differ only in `server` lines, so the runtime API
/// can make the change without a reload.
fn only_servers_differ(old: &str, new: &str) -> bool {
    let rest =
        |t: &str| t.lines().filter(|l| !l.trim_start().starts_with("server ")).collect::<Vec<_>>().join("\n");
    rest(old) == rest(new)
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn applied_marker(paths: &Paths) -> PathBuf {
    paths.runtime_dir.join("applied.sha256")
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
    let loaded = effective(yaml, inputs, &sources, &paths);
    let config = &loaded.config;
    let binary = Binary::new(&config.haproxy.binary);
    let version = binary.version().await.map_err(AgentError::Binary)?;

    for dir in [&paths.runtime_dir, &paths.state_dir] {
        fsutil::ensure_private_dir(dir).map_err(|source| AgentError::Files { path: dir.clone(), source })?;
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
    for method in ["runtime", "reload"] {
        metrics.master_changes_total.with_label_values(&[method]);
    }
    metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &version.full]).set(1);

    let haproxy = match Haproxy::adopt(&binary, &paths).await {
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
            let h = Haproxy::spawn(&binary, &paths, &output).await?;
            tracing::info!(pid = h.pid(), config = loaded.rendered.short_hash(), "started HAProxy");
            h
        }
    };
    // What the master runs: the new render, unless an adopted master runs
    // something else (the config changed while no agent was running).
    let mut running = Running::of(&loaded.rendered);
    let mut stale_adoption = false;
    if haproxy.adopted() {
        let marker = std::fs::read_to_string(applied_marker(&paths)).unwrap_or_default();
        if marker.trim() != loaded.rendered.hash {
            stale_adoption = true;
            running.hash = marker.trim().to_owned();
            running.text = std::fs::read_to_string(paths.config_file()).unwrap_or_default();
        }
    }
    let applied = Applied { loaded, at: SystemTime::now() };

    let listen = applied.loaded.config.listen.0;
    wait_for_frontend(listen, Duration::from_secs(10)).await?;

    let heartbeat = Arc::new(AtomicU64::new(http::now_ms()));
    let (status_tx, status_rx) = watch::channel(Status::default());
    let mut agent = Agent {
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
    let pidfile = agent.paths.runtime_dir.join("apilb.pid");
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
    let staging = paths.runtime_dir.join("haproxy.cfg.next");
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
    let marker = applied_marker(paths);
    fsutil::write_atomic(&marker, rendered.hash.as_bytes(), 0o600)
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
            tokio::select! {
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

    /// SIGHUP: apply the config file now, without waiting for it to settle.
    async fn reload_now(&mut self) {
        systemd::notify("RELOADING=1");
        match self.load_effective() {
            Ok(loaded) if loaded.rendered.hash == self.running.hash => {
                tracing::info!(
                    config = loaded.rendered.short_hash(),
                    "reload requested; the configuration is unchanged"
                );
                self.clear_error();
            }
            Ok(loaded) => self.apply(loaded, "reload requested").await,
            Err(e) => self.refuse("invalid_config", e.to_string(), true),
        }
        self.publish_config();
        systemd::notify("READY=1");
    }

    /// Every second: re-render, and apply a change once two consecutive
    /// reads agree (so a file caught mid-write is not applied).
    async fn watch_config(&mut self) {
        match self.load_effective() {
            Ok(loaded) => {
                let hash = loaded.rendered.hash.clone();
                if self.refused_hash.as_deref() == Some(&hash) {
                    self.candidate = None;
                } else if hash == self.running.hash {
                    self.candidate = None;
                    if self.last_error.is_some() {
                        tracing::info!("the configuration file is back to the config in effect");
                        self.clear_error();
                    }
                } else if self.candidate.as_deref() == Some(&hash) {
                    self.candidate = None;
                    self.apply(loaded, "configuration or referenced files changed").await;
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
        let old = &self.applied.loaded.config;
        let new = &loaded.config;
        if old.haproxy.runtime_dir != new.haproxy.runtime_dir
            || old.haproxy.state_dir != new.haproxy.state_dir
            || old.haproxy.binary != new.haproxy.binary
            || old.metrics.listen != new.metrics.listen
        {
            let msg = "haproxy.binary, haproxy.runtime_dir, haproxy.state_dir and metrics.listen only \
                       change when apilb restarts (systemctl restart apilb)";
            self.refused_hash = Some(loaded.rendered.hash.clone());
            self.refuse("invalid_config", msg.into(), false);
            return;
        }
        let staged = match stage_and_validate(&self.binary, &self.paths, &loaded.rendered).await {
            Ok(p) => p,
            Err(e) => {
                self.refused_hash = Some(loaded.rendered.hash.clone());
                let result = if matches!(e, BinaryError::Rejected { .. }) { "refused" } else { "failed" };
                self.refuse(result, format!("{}: {e}", self.opts.config_path.display()), true);
                return;
            }
        };
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
            tracing::warn!(error = %e, "cannot save server state before the reload; masters start UP in the new worker");
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
                let restored =
                    fsutil::write_atomic(&self.paths.config_file(), self.running.text.as_bytes(), 0o600)
                        .and_then(|()| {
                            fsutil::write_atomic(
                                &applied_marker(&self.paths),
                                self.running.hash.as_bytes(),
                                0o600,
                            )
                        });
                if let Err(re) = restored {
                    tracing::error!(error = %re, "cannot restore the previous haproxy.cfg");
                }
                self.output.set_redactor(self.running.redactor.clone());
                self.refused_hash = Some(loaded.rendered.hash.clone());
                let result = match e {
                    ReloadError::Refused { .. } => "refused",
                    _ => "failed",
                };
                self.refuse(result, e.to_string(), true);
            }
        }
    }

    fn accept(&mut self, loaded: Loaded) {
        let old = &self.applied.loaded.config;
        let discovery_changed = old.discovery != loaded.config.discovery
            || old.listen != loaded.config.listen
            || old.health.tls.server_name() != loaded.config.health.tls.server_name();
        self.metrics.config_info.reset();
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

    /// Loads apilb.yaml and its files and renders them with the masters of
    /// the current policy.
    fn load_effective(&mut self) -> Result<Loaded, LoadError> {
        let (yaml, inputs) = crate::load_parts(&self.opts.config_path)?;
        self.sources.seeds.clone_from(&yaml.masters);
        if yaml.discovery.kubernetes.is_none() {
            self.sources.persisted.clear();
            self.sources.discovered = None;
        }
        Ok(effective(yaml, inputs, &self.sources, &self.paths))
    }

    /// (Re)starts the discovery watcher for the config in effect.
    fn restart_discovery(&mut self) {
        self.stop_discovery();
        let config = &self.applied.loaded.config;
        let Some(settings) = config.discovery.kubernetes.clone() else {
            self.status.discovery = None;
            self.metrics.discovery_enabled.set(0);
            return;
        };
        self.metrics.discovery_enabled.set(1);
        let (tx, rx) = mpsc::channel(16);
        let opts = discovery::Options {
            settings,
            local: crate::status_client::target(config.listen.0),
            server_name: config.health.tls.server_name().to_owned(),
            watch_timeout: Duration::from_secs(290),
        };
        self.discovery = Some(discovery::spawn(opts, tx));
        self.discovery_rx = Some(rx);
        self.status.discovery.get_or_insert_with(DiscoveryStatus::default);
    }

    fn stop_discovery(&mut self) {
        if let Some(task) = self.discovery.take() {
            task.abort();
        }
        self.discovery_rx = None;
    }

    /// A report from the discovery watcher.
    async fn on_discovery(&mut self, update: discovery::Update) {
        let status = self.status.discovery.get_or_insert_with(DiscoveryStatus::default);
        match update {
            discovery::Update::Found { addresses, refused, api } => {
                let now = unix_now();
                status.api = api.to_owned();
                status.last_success = Some(now);
                status.last_error = None;
                self.metrics.discovery_last_success_timestamp_seconds.set(now);
                if !refused.is_empty() && status.refused != refused {
                    tracing::warn!("discovery refused addresses the API listed: {}", refused.join("; "));
                }
                status.refused = refused;
                self.last_discovery_problem = None;
                if self.sources.discovered.is_none() {
                    tracing::info!(
                        api,
                        count = addresses.len(),
                        "discovery succeeded; the discovered API servers replace the static seeds"
                    );
                }
                self.sources.discovered = Some(addresses);
                self.apply_masters().await;
            }
            discovery::Update::Alive => {
                let now = unix_now();
                status.last_success = Some(now);
                status.last_error = None;
                self.metrics.discovery_last_success_timestamp_seconds.set(now);
            }
            discovery::Update::Restarted(why) => {
                status.watch_restarts += 1;
                status.last_error = Some(why.clone());
                self.metrics.discovery_watch_restarts_total.inc();
                tracing::warn!("discovery watch restarted: {why}");
            }
            discovery::Update::Failing(why) => {
                status.last_error = Some(why.clone());
                if self.last_discovery_problem.as_deref() != Some(&why) {
                    tracing::warn!("discovery: {why}");
                    self.last_discovery_problem = Some(why);
                }
            }
        }
        self.publish();
    }

    /// Brings HAProxy's masters in line with the policy: through the
    /// runtime API when only servers change, else by a validated reload.
    async fn apply_masters(&mut self) {
        let desired = self.sources.desired();
        if desired == self.applied.loaded.config.masters {
            // Same servers; sources may have changed (static → discovered).
            self.mark_applied();
            return;
        }
        let mut config = self.applied.loaded.config.clone();
        config.masters = desired;
        let loaded = crate::assemble(config, self.applied.loaded.inputs.clone(), &self.paths);
        let change = runtime::diff(&self.applied.loaded.config.masters, &loaded.config.masters);
        let runtime_ok = self.haproxy.is_some()
            && only_servers_differ(&self.running.text, &loaded.rendered.text)
            && change.added.iter().all(|m| !m.address.is_dns());
        if runtime_ok {
            match self.apply_runtime(&loaded, &change).await {
                Ok(()) => {
                    let names = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
                    tracing::info!(
                        added = %names(change.added.iter().map(|m| format!("{} ({})", m.name, m.address)).collect()),
                        removed = %names(change.removed.clone()),
                        config = loaded.rendered.short_hash(),
                        "masters changed through HAProxy's runtime API (no reload); removed ones drain"
                    );
                    self.metrics
                        .master_changes_total
                        .with_label_values(&["runtime"])
                        .inc_by(change.len() as u64);
                    self.running = Running::of(&loaded.rendered);
                    self.applied = Applied { loaded, at: SystemTime::now() };
                    self.metrics.config_info.reset();
                    self.mark_applied();
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot change the masters at run time ({e}); falling back to a reload")
                }
            }
        }
        let hash = loaded.rendered.hash.clone();
        self.apply(loaded, "the master set changed").await;
        if self.running.hash == hash {
            self.metrics.master_changes_total.with_label_values(&["reload"]).inc_by(change.len() as u64);
            // A reload dropped the draining servers from the new worker.
            self.draining.clear();
        }
    }

    /// Validates the new file, adds and drains servers through the runtime
    /// API, then puts the file in place so a restart yields the same set.
    async fn apply_runtime(&mut self, loaded: &Loaded, change: &runtime::Change) -> Result<(), String> {
        let staged = stage_and_validate(&self.binary, &self.paths, &loaded.rendered)
            .await
            .map_err(|e| e.to_string())?;
        let h = self.haproxy.as_ref().ok_or("HAProxy is not running")?;
        let plan = CheckPlan::new(&loaded.config, &loaded.inputs, &self.paths);
        let (back, fresh): (Vec<_>, Vec<_>) =
            change.added.iter().cloned().partition(|m| self.draining.contains_key(&m.name));
        for m in &back {
            runtime::undrain(h, &m.name).await.map_err(|e| e.to_string())?;
            self.draining.remove(&m.name);
        }
        let health = &loaded.config.health;
        let wait = health.interval.std() + health.timeout.std() + Duration::from_millis(500);
        let haproxy = self.haproxy.as_ref().ok_or("HAProxy is not running")?;
        runtime::add(haproxy, &plan, &fresh, wait).await.map_err(|e| e.to_string())?;
        let limit = loaded.config.haproxy.hard_stop_after.std();
        for name in &change.removed {
            runtime::drain(haproxy, name).await.map_err(|e| e.to_string())?;
            self.draining.insert(name.clone(), Instant::now() + limit);
        }
        promote(&self.paths, &staged, &loaded.rendered).map_err(|e| e.to_string())
    }

    /// Deletes removed masters once their sessions are gone (or the drain
    /// limit, `haproxy.hard_stop_after`, has passed).
    async fn finish_draining(&mut self, stats: &Stats) {
        let Some(h) = &self.haproxy else { return };
        let mut done = Vec::new();
        for (name, deadline) in &self.draining {
            let twin = format!("{name}{FALLBACK_SUFFIX}");
            let rows: Vec<_> = stats.servers.iter().filter(|s| &s.name == name || s.name == twin).collect();
            if rows.is_empty() {
                done.push(name.clone());
                continue;
            }
            let sessions: u64 = rows.iter().map(|s| s.sessions).sum();
            if sessions == 0 || Instant::now() >= *deadline {
                match runtime::delete(h, name).await {
                    Ok(()) => {
                        tracing::info!(master = %name, cut = sessions, "removed master deleted from HAProxy");
                        done.push(name.clone());
                    }
                    Err(e) => tracing::warn!(master = %name, "cannot delete a removed master yet: {e}"),
                }
            }
        }
        for name in done {
            self.draining.remove(&name);
        }
    }

    fn clear_error(&mut self) {
        self.last_error = None;
        self.status.config.pending_error = None;
    }

    /// Reports a refused change once per distinct error.
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
        self.status.config.last_reload =
            Some(ReloadRecord { at: unix_now(), result: result.into(), message: Some(message.clone()) });
        self.status.config.pending_error = Some(message.clone());
        self.last_error = Some(message);
    }

    /// Deletes client bundles that no config in effect refers to.
    fn remove_unused_files(&self) {
        let keep: Vec<PathBuf> =
            self.applied.loaded.rendered.aux_files.iter().map(|a| a.path.clone()).collect();
        let Ok(entries) = std::fs::read_dir(&self.paths.runtime_dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("check-client-") && name.ends_with(".pem") && !keep.contains(&e.path()) {
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
        // them so the new master can bind the port.
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.workers_seen.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        for pid in self.workers_seen.drain(..).filter(|p| alive(*p)) {
            tracing::warn!(pid, "terminating a worker orphaned by the dead master");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match Haproxy::spawn(&self.binary, &self.paths, &self.output).await {
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

    /// Reads HAProxy's process tree and server states, updates metrics and
    /// status, and logs state transitions.
    async fn poll(&mut self) {
        let Some(h) = &self.haproxy else {
            self.publish();
            return;
        };
        let (proc, stats) = tokio::join!(h.show_proc(), h.show_stat());
        match &proc {
            Ok(p) => {
                self.workers_seen = p.workers.iter().chain(&p.old_workers).map(|w| w.pid).collect();
                self.status.haproxy.master_pid = Some(p.master_pid);
                self.status.haproxy.workers = p.workers.iter().map(|w| w.pid).collect();
                self.status.haproxy.old_workers = p.old_workers.iter().map(|w| w.pid).collect();
                self.metrics.haproxy_workers.with_label_values(&["current"]).set(p.workers.len() as i64);
                self.metrics.haproxy_workers.with_label_values(&["old"]).set(p.old_workers.len() as i64);
            }
            Err(e) => {
                self.metrics.poll_errors_total.inc();
                tracing::warn!(error = %e, "cannot read HAProxy's process list");
            }
        }
        self.status.haproxy.running = proc.is_ok();
        self.status.haproxy.adopted = h.adopted();
        self.status.haproxy.version = self.version.full.clone();
        self.metrics.haproxy_up.set(i64::from(proc.is_ok()));
        match stats {
            Ok(stats) => {
                self.observe(&stats);
                self.finish_draining(&stats).await;
            }
            Err(e) => {
                self.metrics.poll_errors_total.inc();
                tracing::warn!(error = %e, "cannot read HAProxy's server states");
            }
        }
        self.publish();
    }

    fn observe(&mut self, stats: &Stats) {
        let config = &self.applied.loaded.config;
        self.status.listen = config.listen.to_string();
        self.status.haproxy.frontend_open =
            stats.frontends.iter().any(|f| f.name == crate::render::FRONTEND && f.status == "OPEN");
        let now = unix_now();
        let mut masters = Vec::with_capacity(config.masters.len());
        for m in &config.masters {
            let row = stats.servers.iter().find(|s| s.backend == crate::render::BACKEND && s.name == m.name);
            let fallback_name = format!("{}{FALLBACK_SUFFIX}", m.name);
            let twin = stats.servers.iter().find(|s| s.name == fallback_name);
            let mut ms = MasterStatus {
                name: m.name.clone(),
                address: m.address.to_string(),
                source: self.sources.source_of(m).as_str().into(),
                state: "unknown".into(),
                fallback_sessions: twin.map(|t| t.sessions).unwrap_or(0),
                ..MasterStatus::default()
            };
            self.metrics
                .master_fallback_sessions
                .with_label_values(&[&m.name])
                .set(ms.fallback_sessions as i64);
            if let Some(row) = row {
                let state = row.state();
                ms.state = state.as_str().into();
                ms.check_status = row.check_status.clone();
                ms.check_desc = row.check_desc.clone();
                ms.check_code = row.check_code;
                ms.check_info = row.last_check.clone();
                ms.check_duration_ms = row.check_duration_ms;
                ms.since_change_s = row.last_change_s;
                ms.sessions = row.sessions;
                ms.connect_errors = row.connect_errors;

                let name = m.name.as_str();
                self.metrics.set_state(name, Some(state));
                let prev_check = self.check_statuses.insert(name.to_owned(), row.check_status.clone());
                self.metrics.set_check_status(name, prev_check.as_deref(), &row.check_status);
                self.metrics
                    .master_check_http_code
                    .with_label_values(&[name])
                    .set(i64::from(row.check_code.unwrap_or(0)));
                self.metrics
                    .master_check_duration_seconds
                    .with_label_values(&[name])
                    .set(row.check_duration_ms.unwrap_or(0) as f64 / 1000.0);
                self.metrics.master_sessions.with_label_values(&[name]).set(row.sessions as i64);
                self.metrics.observe_counters(
                    name,
                    ServerCounters {
                        errors: row.connect_errors,
                        retries: row.retries,
                        redispatches: row.redispatches,
                    },
                );
                if let Some(s) = row.last_change_s {
                    self.metrics
                        .master_last_transition_timestamp_seconds
                        .with_label_values(&[name])
                        .set(now - s as f64);
                }
                match self.states.insert(name.to_owned(), state) {
                    Some(prev) if prev != state => {
                        self.metrics
                            .master_transitions_total
                            .with_label_values(&[name, state.as_str()])
                            .inc();
                        let code = row.check_code.map(|c| format!(", HTTP {c}")).unwrap_or_default();
                        let info = if row.last_check.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", row.last_check)
                        };
                        tracing::info!(
                            master = name,
                            address = %m.address,
                            from = prev.as_str(),
                            to = state.as_str(),
                            check = %row.check_status,
                            "{name} is {} (was {}): {} {}{code}{info}",
                            state.as_str(),
                            prev.as_str(),
                            row.check_status,
                            row.check_desc,
                        );
                    }
                    _ => {}
                }
            }
            masters.push(ms);
        }
        // Removed masters still finishing their connections.
        for name in self.draining.keys() {
            if let Some(row) =
                stats.servers.iter().find(|s| s.backend == crate::render::BACKEND && &s.name == name)
            {
                masters.push(MasterStatus {
                    name: name.clone(),
                    address: row.addr.clone(),
                    source: "removed (draining)".into(),
                    state: row.state().as_str().into(),
                    check_status: row.check_status.clone(),
                    check_desc: row.check_desc.clone(),
                    check_code: row.check_code,
                    sessions: row.sessions,
                    ..MasterStatus::default()
                });
            }
        }
        self.status.masters = masters;
        let healthy = self.status.healthy();
        self.metrics.masters_healthy.set(healthy as i64);
    }

    fn publish_config(&mut self) {
        self.status.config.path = self.opts.config_path.display().to_string();
        self.publish();
    }

    /// Sends the status to watchers and systemd when it changed.
    fn publish(&mut self) {
        self.status.version = env!("CARGO_PKG_VERSION").into();
        if self.status.listen.is_empty() {
            self.status.listen = self.applied.loaded.config.listen.to_string();
        }
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
