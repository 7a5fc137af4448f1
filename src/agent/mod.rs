//! The agent: keeps HAProxy running the configuration that apilb.yaml
//! describes, and reports what it sees.
//!
//! ```text
//!  signals ──► Control ──┐
//!  every 1s: re-read ────┼──► reconcile: Reconciler → Outcome ──► observe
//!  discovery report ─────┤      (validate → write → reload → confirm, or runtime API)
//!  every check interval ─┼──► poll: show proc + show stat ──► observe
//!  HAProxy master dies ──┘──► supervise: respawn with backoff on the last good config
//! ```
//!
//! One job per module: [`reconcile`] decides and applies changes through
//! the [`plane::DataPlane`] seam (unit-tested with a fake HAProxy),
//! [`supervise`] owns the HAProxy process and its restart backoff,
//! [`observe`] owns status and metrics, [`masters`] handles discovery's
//! reports and master-set changes, [`diff`] chooses between a runtime
//! change and a reload from the structured config. This file starts the
//! agent and runs the loop that routes events between them.
//!
//! Invariants: HAProxy only ever runs a config `haproxy -c` accepted; a
//! refused change leaves the running config and the file on disk as they
//! were; the agent exiting (even SIGKILL) never stops HAProxy unless asked
//! to (Shutdown).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior, interval, sleep};

mod checks;
mod diff;
mod masters;
mod observe;
mod plane;
mod reconcile;
mod supervise;

use checks::Checks;
use masters::effective;
use observe::Observer;
use reconcile::{Applied, FileError, Outcome, Reconciler, Running, Step};
use supervise::Supervisor;

use crate::config::Config;
use crate::discovery::{self, persist};
use crate::fsutil;
use crate::haproxy::cli::POLL_TIMEOUT;
use crate::haproxy::output::Output;
use crate::haproxy::supervisor::{Haproxy, SupervisorError};
use crate::haproxy::{Binary, BinaryError, Version};
use crate::http::{self, HttpState};
use crate::layout::Paths;
use crate::masters::Sources;
use crate::metrics::Metrics;
use crate::status::Status;
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

impl From<FileError> for AgentError {
    fn from(e: FileError) -> Self {
        AgentError::Files { path: e.path, source: e.source }
    }
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

/// How often the config and the files it names are re-read.
const CONFIG_POLL: Duration = Duration::from_secs(1);

/// The running agent: the three jobs and the event sources that feed them.
struct Agent {
    /// How it was started.
    opts: Options,
    /// The runtime layout.
    paths: Paths,
    /// The HAProxy process.
    supervisor: Supervisor,
    /// The desired and the running config.
    reconciler: Reconciler,
    /// Status and metrics.
    observer: Observer,
    /// When the loop last turned, for `/healthz`: a stuck agent is seen.
    heartbeat: Arc<AtomicU64>,
    /// Seeds, persisted and discovered masters: what the set is made of.
    sources: Sources,
    /// The discovery watcher, when configured.
    discovery: Option<JoinHandle<()>>,
    /// Its reports.
    discovery_rx: Option<mpsc::Receiver<discovery::Update>>,
    /// The last discovery problem logged, so it is logged once.
    last_discovery_problem: Option<String>,
    /// The persistent checker's checkers (`health.checker: persistent`).
    checks: Checks,
    /// Masters HAProxy reports marked DOWN, as (backend, server), the
    /// moment it prints so: where HAProxy cannot be trusted to close their
    /// sessions ([`crate::render::Features::shutdown_sessions_on_mark_down`]),
    /// the agent does it at once.
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
    let sources = initial_sources(&yaml, &paths);
    let binary = Binary::new(&yaml.haproxy.binary);
    let version = binary.version().await.map_err(AgentError::Binary)?;
    let loaded = effective(yaml, inputs, &sources, &paths, version.features());
    prepare_host(&loaded.config, &paths)?;
    let metrics_listener = TcpListener::bind(loaded.config.metrics.listen.0)
        .await
        .map_err(|source| AgentError::Bind { addr: loaded.config.metrics.listen.0, source })?;
    let metrics_addr = metrics_listener.local_addr().unwrap_or(loaded.config.metrics.listen.0);
    let output = Output::open(&paths.output_fifo())
        .map_err(|source| AgentError::Files { path: paths.output_fifo(), source })?;
    output.set_redactor(loaded.rendered.redactor.clone());
    let metrics = Arc::new(Metrics::new());
    metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &version.full]).set(1);

    let haproxy = adopt_or_spawn(&binary, &version, &paths, &output, &loaded, &opts).await?;
    let (applied, running, after) = adoption(&haproxy, loaded, &paths);
    wait_for_frontend(applied.loaded.config.listen.0, Duration::from_secs(10)).await?;

    let heartbeat = Arc::new(AtomicU64::new(http::now_ms()));
    let (status_tx, status_rx) = watch::channel(Status::default());
    let mut agent = Agent {
        marked_down: output.marked_down_events(),
        reconciler: Reconciler::new(paths.clone(), opts.config_path.clone(), applied, running),
        supervisor: Supervisor::new(binary, version, paths.clone(), output, haproxy),
        observer: Observer::new(metrics.clone(), status_tx),
        paths,
        heartbeat: heartbeat.clone(),
        sources,
        discovery: None,
        discovery_rx: None,
        last_discovery_problem: None,
        checks: Checks::new(),
        opts,
    };
    agent.first_steps(after).await;

    let interval = agent.reconciler.applied.loaded.config.health.interval.std();
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
    agent.write_pidfile();
    let (control_tx, control_rx) = mpsc::channel(16);
    let task = tokio::spawn(async move {
        let exit = agent.run(control_rx).await;
        let _ = http_stop.send(true);
        exit
    });
    Ok(Handle { control: control_tx, status: status_rx, metrics_addr, task })
}

/// The masters to start from: the seeds, and with discovery the set the
/// previous run saved.
fn initial_sources(yaml: &Config, paths: &Paths) -> Sources {
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
    sources
}

/// Checks what the host must give before anything is bound: file
/// descriptors for `maxconn`, private directories; warns about listeners
/// off loopback.
fn prepare_host(config: &Config, paths: &Paths) -> Result<(), AgentError> {
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
    Ok(())
}

/// Adopts the master an earlier agent left running, or validates the
/// render, puts it in place and starts HAProxy on it.
async fn adopt_or_spawn(
    binary: &Binary,
    version: &Version,
    paths: &Paths,
    output: &Output,
    loaded: &Loaded,
    opts: &Options,
) -> Result<Haproxy, AgentError> {
    if let Some(h) = Haproxy::adopt(paths, version).await {
        tracing::info!(pid = h.pid(), "adopted the running HAProxy master; the data plane was not touched");
        return Ok(h);
    }
    let staging = paths.staging_config();
    let validated = binary.validate_at(&loaded.rendered, paths, &staging).await;
    let warnings = validated.map_err(|source| {
        let _ = std::fs::remove_file(&staging);
        AgentError::Rejected { path: opts.config_path.display().to_string(), source }
    })?;
    for w in warnings {
        tracing::warn!(target: "haproxy", "{}", loaded.rendered.redact(&w));
    }
    reconcile::promote(paths, &staging, loaded)?;
    let h = Haproxy::spawn(binary, version, paths, output).await?;
    tracing::info!(pid = h.pid(), config = loaded.rendered.short_hash(), "started HAProxy");
    Ok(h)
}

/// What remains to do once the agent runs, after adopting a master.
#[derive(Debug, PartialEq, Eq)]
enum AfterStart {
    /// HAProxy runs the config in effect.
    Nothing,
    /// The adopted master runs other masters (an earlier agent learned
    /// them): align them at run time; an agent upgrade must not reload.
    SyncMasters,
    /// The adopted master runs an older config: reload.
    Reload,
}

/// What HAProxy runs once `haproxy` is started or adopted, and what the
/// agent must do about it. An adopted master may run another version than
/// the binary on disk (renders follow it), and a config other than the one
/// apilb.yaml describes now (the file changed while no agent ran): the
/// marker names the config it runs.
fn adoption(haproxy: &Haproxy, loaded: Loaded, paths: &Paths) -> (Applied, Running, AfterStart) {
    let features = haproxy.version().features();
    let loaded = if features == loaded.rendered.features {
        loaded
    } else {
        crate::assemble(loaded.config, loaded.inputs, paths, features)
    };
    if !haproxy.adopted() {
        let running = Running::of(&loaded);
        return (Applied::now(loaded), running, AfterStart::Nothing);
    }
    let marker = std::fs::read_to_string(paths.applied_marker()).unwrap_or_default();
    let text = std::fs::read_to_string(paths.config_file()).unwrap_or_default();
    reconcile_adopted(loaded, marker.trim(), text, paths)
}

/// [`adoption`]'s decision for an adopted master whose marker says
/// `fingerprint` and whose file holds `text`.
fn reconcile_adopted(
    loaded: Loaded,
    fingerprint: &str,
    text: String,
    paths: &Paths,
) -> (Applied, Running, AfterStart) {
    if fingerprint == loaded.rendered.fingerprint {
        let running = Running::of(&loaded);
        return (Applied::now(loaded), running, AfterStart::Nothing);
    }
    // When the adopted HAProxy differs only in its servers, take its set
    // over as it is and converge through the runtime API.
    if let Some(current) = masters::running_set(&text, fingerprint, &loaded, paths) {
        let running = Running::of(&current);
        return (Applied::now(current), running, AfterStart::SyncMasters);
    }
    let running = Running::adopted(text, fingerprint.to_owned(), loaded.rendered.redactor.clone());
    (Applied::now(loaded), running, AfterStart::Reload)
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

/// Waits for the next message on an optional channel; pending without one
/// or once it is closed.
async fn next<T>(rx: Option<&mut mpsc::Receiver<T>>) -> T {
    match rx {
        Some(rx) => match rx.recv().await {
            Some(v) => v,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Publishes the config in effect, starts discovery, finishes an
    /// adoption and takes the first poll.
    async fn first_steps(&mut self, after: AfterStart) {
        self.config_in_effect();
        self.restart_discovery();
        match after {
            AfterStart::Nothing => {}
            AfterStart::SyncMasters => {
                tracing::info!(
                    "the adopted HAProxy runs other masters than the candidates; aligning them at run time"
                );
                self.apply_masters().await;
            }
            AfterStart::Reload => {
                tracing::info!(
                    "the adopted HAProxy runs an older config than apilb.yaml describes; reloading"
                );
                match self.load_effective() {
                    Ok(loaded) => self.apply(loaded, "config changed while no agent was running").await,
                    Err(e) => self.observer.not_applied(
                        reconcile::Refusal {
                            result: crate::status::ReloadResult::InvalidConfig,
                            message: e.to_string(),
                            always: true,
                        },
                        &self.reconciler.running.hash,
                    ),
                }
            }
        }
        self.publish_config();
        self.poll().await;
    }

    /// For `apilb reload` and operators: which process is the agent.
    fn write_pidfile(&self) {
        let pidfile = self.paths.agent_pidfile();
        if let Err(e) = fsutil::write_atomic(&pidfile, format!("{}\n", std::process::id()).as_bytes(), 0o600)
        {
            tracing::warn!(error = %e, path = %pidfile.display(), "cannot write the agent's pidfile");
        }
    }

    async fn run(mut self, mut control: mpsc::Receiver<Control>) -> Exit {
        let check_interval =
            self.reconciler.applied.loaded.config.health.interval.std().max(Duration::from_millis(200));
        let mut poll_tick = interval(check_interval);
        poll_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut config_tick = interval(CONFIG_POLL);
        config_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.heartbeat.store(http::now_ms(), Ordering::Relaxed);
            tokio::select! {
                (backend, server) = next(self.marked_down.as_mut()) => {
                    if backend == crate::render::BACKEND {
                        self.close_sessions_of(&server).await;
                    }
                }
                update = next(self.discovery_rx.as_mut()) => self.on_discovery(update).await,
                (name, verdict) = self.checks.next() => self.on_verdict(&name, verdict).await,
                c = control.recv() => match c.unwrap_or(Control::Shutdown) {
                    Control::Reload => self.reload_now().await,
                    Control::Handover => return self.handover(),
                    Control::Shutdown => return self.shutdown(&mut control).await,
                },
                exit = self.supervisor.exited() => self.on_haproxy_exit(exit.status),
                () = self.supervisor.respawn_due() => self.respawn().await,
                _ = poll_tick.tick() => self.poll().await,
                _ = config_tick.tick() => self.watch_config().await,
            }
        }
    }

    /// SIGHUP: apply the config file now, without waiting for it to settle.
    async fn reload_now(&mut self) {
        systemd::notify("RELOADING=1");
        let read = self.load_effective();
        match self.reconciler.on_reload_request(read) {
            Step::InEffect => {
                tracing::info!(
                    config = self.reconciler.running.hash.get(..12).unwrap_or_default(),
                    "reload requested; the configuration is unchanged"
                );
                self.observer.clear_error();
            }
            Step::Apply(loaded) => self.apply(*loaded, "reload requested").await,
            Step::Invalid(refusal) => self.observer.not_applied(refusal, &self.reconciler.running.hash),
            Step::Wait => {}
        }
        self.observer.status.config.reload_requests += 1;
        self.publish_config();
        systemd::notify("READY=1");
    }

    /// Every second: re-render, and apply a change once two consecutive
    /// reads agree (so a file caught mid-write is not applied).
    async fn watch_config(&mut self) {
        let read = self.load_effective();
        // HAProxy runs but did not answer its last poll (frozen,
        // overloaded): a reload would only wait for it and hold the loop
        // up. The change is applied once it answers.
        let answers = self.supervisor.haproxy().is_none() || self.observer.status.haproxy.running;
        match self.reconciler.on_read(read, answers) {
            Step::Wait => {}
            Step::InEffect => {
                if self.observer.has_error() {
                    tracing::info!("the configuration file is back to the config in effect");
                    self.observer.clear_error();
                }
            }
            Step::Apply(loaded) => self.apply(*loaded, "configuration or referenced files changed").await,
            Step::Invalid(refusal) => self.observer.not_applied(refusal, &self.reconciler.running.hash),
        }
        self.publish_config();
    }

    /// Validates a new render, writes it and reloads HAProxy, then reports
    /// the outcome. On any failure the running config and the file on disk
    /// stay as they were.
    async fn apply(&mut self, loaded: Loaded, why: &str) {
        let outcome = match self.reconciler.stage(&self.supervisor, loaded).await {
            Err(refusal) => Outcome::NotApplied(refusal),
            Ok(staged) => {
                self.capture_counters().await;
                self.reconciler.commit(&self.supervisor, staged, why).await
            }
        };
        match outcome {
            Outcome::Applied { discovery_changed } => {
                self.config_in_effect();
                self.observer.applied();
                if discovery_changed {
                    self.restart_discovery();
                }
            }
            Outcome::NotApplied(refusal) => self.observer.not_applied(refusal, &self.reconciler.running.hash),
        }
    }

    /// Reads the serving worker's servers once more just before a reload
    /// replaces it: the new worker counts from zero, so what the old one
    /// counted since the last poll would otherwise be lost.
    async fn capture_counters(&mut self) {
        let Some(h) = self.supervisor.haproxy() else { return };
        if let Ok(stats) = h.show_stat_within(POLL_TIMEOUT).await {
            let config = &self.reconciler.applied.loaded.config;
            self.observer.observe(&stats, config, &self.sources, self.reconciler.draining.keys());
        }
    }

    /// Reads HAProxy's process tree and server states into status and
    /// metrics; deletes drained masters and closes the sessions of failed
    /// ones where HAProxy does not.
    async fn poll(&mut self) {
        // Short limits: a frozen HAProxy shows as down at this poll, and
        // the agent's loop is not held up by it.
        let Some((proc, stats)) = self.supervisor.poll(POLL_TIMEOUT).await else {
            self.observer.publish();
            return;
        };
        if let Ok(p) = &proc {
            self.supervisor.saw_workers(p);
        }
        if let Some(h) = self.supervisor.haproxy() {
            self.observer.process_tree(&proc, h.adopted(), h.version().full);
        }
        match stats {
            Ok(stats) => {
                let config = &self.reconciler.applied.loaded.config;
                self.observer.observe(&stats, config, &self.sources, self.reconciler.draining.keys());
                self.reconciler.finish_draining(&self.supervisor, &stats).await;
                // A mark-down whose event was missed (the agent was
                // restarting, or the event queue full).
                for name in observe::down_with_sessions(&stats, &self.reconciler.applied.loaded.config) {
                    self.close_sessions_of(&name).await;
                }
                self.reassert_verdicts(&stats).await;
            }
            Err(e) => self.observer.stats_unreadable(&e),
        }
        self.observer.checker_reports(&self.checks.reports());
        self.observer.publish();
    }

    fn on_haproxy_exit(&mut self, status: String) {
        let delay = self.supervisor.died();
        self.observer.haproxy_died();
        tracing::error!(%status, retry_in = ?delay, "HAProxy exited unexpectedly; restarting it on the last good config");
        self.observer.publish();
    }

    async fn respawn(&mut self) {
        match self.supervisor.respawn().await {
            Ok(pid) => {
                tracing::info!(pid, "HAProxy restarted");
                self.observer.haproxy_restarted();
                // Its server states come from the last reload's file: tell
                // it what the checker knows now.
                self.push_all_verdicts().await;
                self.poll().await;
            }
            Err((e, delay)) => tracing::error!(error = %e, retry_in = ?delay, "cannot restart HAProxy"),
        }
    }

    fn publish_config(&mut self) {
        self.observer.status.config.path = self.opts.config_path.display().to_string();
        self.observer.publish();
    }

    fn handover(mut self) -> Exit {
        self.stop_discovery();
        let pid = self.supervisor.haproxy().map(Haproxy::pid);
        tracing::info!(?pid, "handing over: exiting and leaving HAProxy running for the next agent to adopt");
        Exit::HandedOver
    }

    async fn shutdown(mut self, control: &mut mpsc::Receiver<Control>) -> Exit {
        systemd::notify("STOPPING=1");
        self.stop_discovery();
        let Some(h) = self.supervisor.take() else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::Features;

    fn loaded(masters: &str, maxconn: u32) -> Loaded {
        let yaml = format!(
            "masters: [{masters}]\nhealth:\n  tls:\n    insecure_skip_verify: true\nhaproxy:\n  maxconn: {maxconn}\n"
        );
        let config = Config::parse(&yaml, "test").expect("config parses");
        let inputs = crate::inputs::Inputs::gather(&config).expect("inputs");
        let paths = Paths::from_config(&config);
        crate::assemble(config, inputs, &paths, Features::default())
    }

    #[test]
    fn an_adopted_master_is_kept_aligned_or_reloaded() {
        let wanted = loaded("10.0.0.1:6443, 10.0.0.2:6443", 1000);
        let paths = Paths::from_config(&wanted.config);
        // It runs what apilb.yaml describes: nothing to do.
        let text = wanted.rendered.text.expose().to_owned();
        let (applied, running, after) =
            reconcile_adopted(wanted.clone(), &wanted.rendered.fingerprint, text, &paths);
        assert_eq!(after, AfterStart::Nothing);
        assert_eq!(applied.loaded.rendered.fingerprint, running.fingerprint);
        // It runs a set an earlier agent discovered: taken over as it is,
        // then aligned at run time (an agent upgrade must not reload).
        let learned = loaded("10.0.0.1:6443, 10.0.0.9:6443", 1000);
        let text = learned.rendered.text.expose().to_owned();
        let (applied, running, after) =
            reconcile_adopted(wanted.clone(), &learned.rendered.fingerprint, text, &paths);
        assert_eq!(after, AfterStart::SyncMasters);
        assert_eq!(applied.loaded.config.masters, learned.config.masters);
        assert!(running.loaded.is_some(), "a known config: servers may change at run time");
        // It runs older settings: reloaded, and what it runs is known by
        // its text alone.
        let older = loaded("10.0.0.1:6443, 10.0.0.2:6443", 500);
        let text = older.rendered.text.expose().to_owned();
        let (applied, running, after) =
            reconcile_adopted(wanted.clone(), &older.rendered.fingerprint, text, &paths);
        assert_eq!(after, AfterStart::Reload);
        assert_eq!(applied.loaded.rendered.fingerprint, wanted.rendered.fingerprint);
        assert_eq!(running.fingerprint, older.rendered.fingerprint);
        assert!(running.loaded.is_none());
        assert_eq!(running.hash, "(adopted)");
    }
}
