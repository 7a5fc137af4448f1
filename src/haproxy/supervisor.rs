//! The HAProxy master process: start, adopt, reload, stop, and notice
//! when it dies.
//!
//! HAProxy runs in master-worker mode (`-W -S <master.sock> -p <pidfile>`)
//! in its own session, so it outlives apilb: if the agent is killed or
//! restarted the data plane keeps serving, and the next agent *adopts* the
//! master it finds through the pidfile and the master socket. Death is
//! noticed through a pidfd, which works for adopted masters that are not
//! apilb's children.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::process::Command;
use tokio::sync::watch;
use tokio::time::{Instant, sleep};

use super::cli::{self, CliError};
use super::output::Output;
use super::stat::{self, ParseError, ProcInfo, Stats};
use super::{Binary, Version};
use crate::fsutil;
use crate::layout::Paths;

/// Failures of the HAProxy process.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// exec failed.
    #[error("cannot start HAProxy \"{}\": {source}", binary.display())]
    Spawn {
        /// The configured binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// HAProxy exited during start-up; `reason` holds its ALERT lines.
    #[error("HAProxy exited during start-up ({status}): {reason}")]
    StartFailed {
        /// How it exited.
        status: String,
        /// HAProxy's own messages.
        reason: String,
    },
    /// HAProxy did not come up in time.
    #[error("HAProxy did not come up within {0:?}")]
    StartTimeout(Duration),
    /// A socket command failed.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// A socket answer could not be parsed.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A file in the runtime directory could not be handled.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// How a reload ended.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// HAProxy refused the new config; the previous worker keeps serving.
    #[error("HAProxy refused the reload (the previous config keeps serving): {reason}")]
    Refused {
        /// HAProxy's ALERT lines from the master's output.
        reason: String,
    },
    /// The outcome could not be confirmed.
    #[error("cannot confirm the reload: {0}")]
    Unconfirmed(String),
    /// HAProxy 3.1+ refuses a reload while the previous one is still
    /// loading (a reload not made by this agent); the change is retried.
    #[error("HAProxy is still loading a previous reload; retrying")]
    Busy,
    /// Talking to the master failed.
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

/// How the master process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// e.g. `exit status: 137`, or `unknown (adopted process)`.
    pub status: String,
}

/// A running HAProxy master, started or adopted by this agent.
pub struct Haproxy {
    /// Where its sockets, pidfile and config live.
    paths: Paths,
    /// The master's pid: it stays the same across reloads.
    pid: u32,
    /// True when an earlier agent started it.
    adopted: bool,
    /// The version the master runs, from `show proc` (the binary on disk
    /// may differ until the next reload re-executes it). It decides how a
    /// reload is confirmed.
    version: std::sync::Mutex<Version>,
    /// Set once the master exited.
    exited: watch::Receiver<Option<Exit>>,
}

/// How long a reload may take from the request to its confirmed outcome.
const RELOAD_LIMIT: Duration = Duration::from_secs(30);

/// The master CLI's answer to `reload` on HAProxy 2.7+.
#[derive(Debug, PartialEq, Eq)]
enum ReloadReply {
    /// `Success=1`.
    Loaded,
    /// `Success=0` because another reload is still loading (3.1+).
    Busy,
    /// `Success=0`: the startup log's `[ALERT]` lines.
    Failed(Vec<String>),
    /// No status line (the connection closed early): not an answer.
    Missing,
}

/// Parses `Success=1|0`, `--`, then the startup log.
fn parse_reload_reply(text: &str) -> ReloadReply {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next() {
        Some("Success=1") => ReloadReply::Loaded,
        Some("Success=0") => {
            let rest: Vec<&str> = lines.filter(|l| *l != "--").collect();
            if rest.iter().any(|l| l.contains("Another reload is still in progress")) {
                return ReloadReply::Busy;
            }
            ReloadReply::Failed(
                rest.iter()
                    .map(|l| super::output::parse_line(l))
                    .filter(|(severity, _, _)| *severity == super::output::Severity::Alert)
                    .map(|(_, _, message)| message.to_owned())
                    .collect(),
            )
        }
        _ => ReloadReply::Missing,
    }
}

impl Haproxy {
    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True when this agent found the master running rather than starting it.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The HAProxy version the master runs.
    pub fn version(&self) -> Version {
        self.version.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn note_version(&self, proc: &ProcInfo) {
        if let Some(v) = &proc.version {
            *self.version.lock().unwrap_or_else(|e| e.into_inner()) = v.clone();
        }
    }

    fn new(
        paths: &Paths,
        pid: u32,
        adopted: bool,
        version: Version,
        exited: watch::Receiver<Option<Exit>>,
    ) -> Self {
        Haproxy { paths: paths.clone(), pid, adopted, version: std::sync::Mutex::new(version), exited }
    }

    /// True once the master has exited.
    pub fn has_exited(&self) -> bool {
        self.exited.borrow().is_some()
    }

    /// Waits until the master exits.
    pub async fn exited(&self) -> Exit {
        let mut rx = self.exited.clone();
        let exit = rx.wait_for(Option::is_some).await.ok().and_then(|e| e.clone());
        exit.unwrap_or_else(unknown_exit)
    }

    /// Looks for a live master started by an earlier agent with these
    /// paths. Returns `None` when there is none (stale pidfile, other
    /// process, no answer on the master socket). `binary` is the version
    /// of the binary on disk, assumed when `show proc` names none.
    pub async fn adopt(paths: &Paths, binary: &Version) -> Option<Haproxy> {
        let content = match std::fs::read(paths.pidfile()) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => format!("<unreadable: {e}>").into_bytes(),
        };
        let content = String::from_utf8_lossy(&content);
        if let Ok(pid) = content.trim().parse::<u32>()
            && is_ours(pid, paths)
        {
            let proc = show_proc_at(&paths.master_socket(), cli::DEFAULT_TIMEOUT).await.ok()?;
            if proc.master_pid != pid {
                return None;
            }
            let exited = watch_foreign(pid).ok()?;
            let version = proc.version.unwrap_or_else(|| binary.clone());
            return Some(Haproxy::new(paths, pid, true, version, exited));
        }
        Self::adopt_without_pidfile(paths, &content, binary).await
    }

    /// The pidfile names no master of ours (corrupt, truncated, empty or
    /// stale). A master still answering on our master socket is adopted
    /// anyway and the pidfile rewritten: starting a second HAProxy would
    /// fail to bind the frontend (`noreuseport`).
    async fn adopt_without_pidfile(paths: &Paths, content: &str, binary: &Version) -> Option<Haproxy> {
        let pidfile = paths.pidfile();
        let content: String = content.trim().chars().take(40).collect();
        // One attempt first: a socket nothing listens on refuses at once.
        let found = if tokio::net::UnixStream::connect(paths.master_socket()).await.is_ok() {
            show_proc_at(&paths.master_socket(), cli::DEFAULT_TIMEOUT)
                .await
                .ok()
                .filter(|p| is_ours(p.master_pid, paths))
        } else {
            None
        };
        let Some(ProcInfo { master_pid: pid, version, .. }) = found else {
            tracing::warn!(
                path = %pidfile.display(),
                ?content,
                "ignoring the HAProxy pidfile: it names no running HAProxy master of this agent"
            );
            return None;
        };
        let exited = watch_foreign(pid).ok()?;
        tracing::warn!(
            path = %pidfile.display(),
            ?content,
            pid,
            "the HAProxy pidfile does not name the running master; found it through the master socket \
             and rewrote the pidfile"
        );
        if let Err(e) = fsutil::write_atomic(&pidfile, format!("{pid}\n").as_bytes(), 0o644) {
            tracing::warn!(path = %pidfile.display(), error = %e, "cannot rewrite the HAProxy pidfile");
        }
        Some(Haproxy::new(paths, pid, true, version.unwrap_or_else(|| binary.clone()), exited))
    }

    /// Starts a master on the config in the runtime directory and waits
    /// until it runs a worker (on 3.1+ a worker is listed before it is
    /// ready: callers wait for the frontend too). On failure the error
    /// carries HAProxy's own messages, read from `output`. `version` is
    /// the binary's, assumed when `show proc` names none.
    pub async fn spawn(
        binary: &Binary,
        version: &Version,
        paths: &Paths,
        output: &Output,
    ) -> Result<Haproxy, SupervisorError> {
        let started = Instant::now();
        super::repair_server_state(&paths.server_state_file());
        let mut child = master_command(binary, paths, output)?
            .spawn()
            .map_err(|source| SupervisorError::Spawn { binary: binary.path.clone(), source })?;
        let pid = child.id().unwrap_or_default();
        let (tx, exited) = watch::channel(None);
        let dead = exited.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let _ = tx.send(Some(Exit { status }));
        });
        let running = wait_until_up(paths, pid, dead, output, started).await?;
        Ok(Haproxy::new(paths, pid, false, running.unwrap_or_else(|| version.clone()), exited))
    }

    /// `show proc` on the master CLI.
    pub async fn show_proc(&self) -> Result<ProcInfo, SupervisorError> {
        self.show_proc_within(cli::DEFAULT_TIMEOUT).await
    }

    /// `show proc` on the master CLI, failing after `limit` (the agent's
    /// poll uses [`cli::POLL_TIMEOUT`]: a frozen master must show as down
    /// at once, and must not hold up the agent's loop).
    pub async fn show_proc_within(&self, limit: Duration) -> Result<ProcInfo, SupervisorError> {
        show_proc_at(&self.paths.master_socket(), limit).await
    }

    /// `show info` and `show stat` on the worker's stats socket: the
    /// servers and the pid of the worker that counted them.
    pub async fn show_stat(&self) -> Result<Stats, SupervisorError> {
        self.show_stat_within(cli::DEFAULT_TIMEOUT).await
    }

    /// [`Haproxy::show_stat`], failing after `limit`.
    pub async fn show_stat_within(&self, limit: Duration) -> Result<Stats, SupervisorError> {
        let text = cli::command(&self.paths.stats_socket(), stat::INFO_AND_STAT, limit).await?;
        Ok(stat::parse_info_and_stat(&text)?)
    }

    /// A runtime API command on the worker's stats socket.
    pub async fn runtime(&self, command: &str) -> Result<String, SupervisorError> {
        Ok(cli::command(&self.paths.stats_socket(), command, cli::DEFAULT_TIMEOUT).await?)
    }

    /// Saves every server's state (`show servers state`) where the next
    /// worker loads it, so a reload keeps DOWN masters DOWN instead of
    /// starting them UP.
    pub async fn save_server_state(&self) -> Result<(), SupervisorError> {
        let state = self.runtime("show servers state").await?;
        if !state.starts_with('1') {
            return Err(SupervisorError::Parse(ParseError {
                command: "show servers state",
                problem: format!("no version line in {:?}", state.lines().next()),
            }));
        }
        let path = self.paths.server_state_file();
        fsutil::write_atomic(&path, state.as_bytes(), 0o600)
            .map_err(|source| SupervisorError::File { path, source })
    }

    /// Reloads the config file in the runtime directory through the master
    /// CLI and confirms the outcome. The file must have been validated.
    ///
    /// How the outcome is known depends on the version the master runs:
    /// 2.7+ answers `reload` with `Success=1|0` and its startup log (3.1+
    /// only once the new worker is ready, which is the only proof there: a
    /// new worker is listed before it is ready); 2.6 answers nothing, so
    /// its `show proc` counters are compared with the ones from before.
    pub async fn reload(&self, output: &Output) -> Result<ProcInfo, ReloadError> {
        let before = self.show_proc().await?;
        let version = before.version.clone().unwrap_or_else(|| self.version());
        let started = Instant::now();
        let after = if version.reload_reports_status() {
            let reply = cli::command(&self.paths.master_socket(), "reload", RELOAD_LIMIT).await;
            match reply.as_deref().map(parse_reload_reply) {
                Ok(ReloadReply::Loaded) => self.confirm_serving(&before, started).await?,
                Ok(ReloadReply::Busy) => return Err(ReloadError::Busy),
                Ok(ReloadReply::Failed(alerts)) => {
                    let reason = if alerts.is_empty() {
                        refusal_reason(output, started).await
                    } else {
                        output.redact(&alerts.join("; "))
                    };
                    return Err(ReloadError::Refused { reason });
                }
                // 2.7 to 3.0 list the new worker only once the master
                // loaded the config, so the counters still tell.
                Ok(ReloadReply::Missing) | Err(_) if !version.worker_loads_config() => {
                    self.confirm_by_counters(&before, output, started).await?
                }
                Ok(ReloadReply::Missing) => {
                    return Err(self.unconfirmed("the master CLI closed without a reload status"));
                }
                Err(e) => return Err(self.unconfirmed(&e.to_string())),
            }
        } else {
            // The master closes the connection when it re-executes.
            let _ = cli::command(&self.paths.master_socket(), "reload", cli::DEFAULT_TIMEOUT).await;
            self.confirm_by_counters(&before, output, started).await?
        };
        self.note_version(&after);
        Ok(after)
    }

    fn unconfirmed(&self, why: &str) -> ReloadError {
        if self.has_exited() {
            ReloadError::Unconfirmed("HAProxy exited during the reload".into())
        } else {
            ReloadError::Unconfirmed(why.into())
        }
    }

    /// After `Success=1`: the same master, serving with a current worker.
    async fn confirm_serving(&self, before: &ProcInfo, started: Instant) -> Result<ProcInfo, ReloadError> {
        let deadline = started + RELOAD_LIMIT;
        loop {
            if self.has_exited() {
                return Err(self.unconfirmed(""));
            }
            if let Ok(after) = show_proc_at(&self.paths.master_socket(), Duration::from_millis(500)).await
                && after.master_pid == before.master_pid
                && !after.workers.is_empty()
            {
                return Ok(after);
            }
            if Instant::now() >= deadline {
                return Err(ReloadError::Unconfirmed(format!(
                    "HAProxy reported success but listed no worker within {:?}",
                    deadline - started
                )));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// HAProxy 2.6 (and 2.7 to 3.0 without an answer): the master's
    /// reload counter moves on every attempt and its failure counter on
    /// every failed one (reset by the next success).
    async fn confirm_by_counters(
        &self,
        before: &ProcInfo,
        output: &Output,
        started: Instant,
    ) -> Result<ProcInfo, ReloadError> {
        let deadline = started + RELOAD_LIMIT;
        loop {
            if self.has_exited() {
                return Err(self.unconfirmed(""));
            }
            if let Ok(after) = show_proc_at(&self.paths.master_socket(), Duration::from_millis(500)).await {
                if after.failed_reloads > before.failed_reloads {
                    return Err(ReloadError::Refused { reason: refusal_reason(output, started).await });
                }
                if after.reloads > before.reloads && !after.workers.is_empty() {
                    return Ok(after);
                }
            }
            if Instant::now() >= deadline {
                return Err(ReloadError::Unconfirmed(format!(
                    "the master's reload counter did not move within {:?}",
                    deadline - started
                )));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a signal to the master.
    pub fn signal(&self, signal: Signal) {
        if !self.has_exited() {
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Stops HAProxy: a soft stop (listeners close, established
    /// connections finish) for at most `grace`, then a hard stop.
    pub async fn stop(&self, grace: Duration) -> Exit {
        self.signal(Signal::SIGUSR1);
        let exit = match tokio::time::timeout(grace, self.exited()).await {
            Ok(exit) => exit,
            Err(_) => {
                tracing::warn!(
                    ?grace,
                    "HAProxy still has connections after the grace period; stopping it hard"
                );
                self.signal(Signal::SIGTERM);
                match tokio::time::timeout(Duration::from_secs(5), self.exited()).await {
                    Ok(exit) => exit,
                    Err(_) => {
                        self.signal(Signal::SIGKILL);
                        self.exited().await
                    }
                }
            }
        };
        let _ = std::fs::remove_file(self.paths.pidfile());
        exit
    }
}

/// HAProxy's `[ALERT]` lines since `started`, read from its output.
async fn refusal_reason(output: &Output, started: Instant) -> String {
    // Let the reader catch up with the master's last words.
    sleep(Duration::from_millis(50)).await;
    let reason = output.alerts_since(started);
    if reason.is_empty() { "see HAProxy's messages in the log".into() } else { reason }
}

fn unknown_exit() -> Exit {
    Exit { status: "unknown".into() }
}

async fn show_proc_at(socket: &Path, limit: Duration) -> Result<ProcInfo, SupervisorError> {
    let text = cli::command(socket, "show proc", limit).await?;
    Ok(stat::parse_show_proc(&text)?)
}

/// The command that starts a master on the config in the runtime
/// directory: master-worker mode with the master CLI, its own session, no
/// capability, output to the agent's FIFO.
fn master_command(binary: &Binary, paths: &Paths, output: &Output) -> Result<Command, SupervisorError> {
    let file = |path: PathBuf| move |source| SupervisorError::File { path: path.clone(), source };
    let stdout = output.writer().map_err(file(paths.output_fifo()))?;
    let stderr = stdout.try_clone().map_err(file(paths.output_fifo()))?;
    let master = format!("{},mode,600", paths.master_socket().display());
    let mut cmd = Command::new(&binary.path);
    cmd.arg("-W")
        .arg("-S")
        .arg(&master)
        .arg("-f")
        .arg(paths.config_file())
        .arg("-p")
        .arg(paths.pidfile())
        .env_remove("NOTIFY_SOCKET")
        // Not the agent's directory: it may be deleted, or a mount
        // point HAProxy would keep busy for as long as it runs.
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        // HAProxy must outlive apilb: never killed with the handle.
        .kill_on_drop(false);
    // SAFETY: setsid() and prctl() are async-signal-safe. setsid
    // detaches HAProxy from apilb's session and terminal, so Ctrl-C or
    // a terminal hang-up aimed at apilb does not reach the data plane;
    // HAProxy gets none of apilb's ambient capabilities.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(io::Error::from)?;
            super::clear_ambient_capabilities()
        });
    }
    Ok(cmd)
}

/// Waits until the master `pid` lists a worker; returns the version it
/// reports. If it exits first, the error carries its ALERT lines since
/// `started`; if it takes too long, it is killed.
async fn wait_until_up(
    paths: &Paths,
    pid: u32,
    mut dead: watch::Receiver<Option<Exit>>,
    output: &Output,
    started: Instant,
) -> Result<Option<Version>, SupervisorError> {
    let limit = Duration::from_secs(15);
    let up = async {
        loop {
            if let Ok(p) = show_proc_at(&paths.master_socket(), Duration::from_millis(200)).await
                && p.master_pid == pid
                && !p.workers.is_empty()
            {
                return p.version;
            }
            sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        running = up => Ok(running),
        exit = async { dead.wait_for(Option::is_some).await.ok().and_then(|e| e.clone()) } => {
            let status = exit.map(|e| e.status).unwrap_or_default();
            // Let the reader catch up with HAProxy's last words.
            sleep(Duration::from_millis(100)).await;
            let mut reason = output.alerts_since(started);
            if reason.is_empty() {
                reason = "no message from HAProxy (see the log above)".into();
            }
            Err(SupervisorError::StartFailed { status, reason })
        }
        _ = sleep(limit) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            Err(SupervisorError::StartTimeout(limit))
        }
    }
}

/// True when `pid` runs HAProxy with this agent's master socket and config
/// (its master and workers share that command line): guards against a
/// stale pidfile whose pid now belongs to another process.
pub fn is_ours(pid: u32, paths: &Paths) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<String> =
        cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let master = paths.master_socket().display().to_string();
    let config = paths.config_file().display().to_string();
    let has = |flag: &str, value: &str| {
        args.windows(2).any(|w| w[0] == flag && (w[1] == value || w[1].starts_with(&format!("{value},"))))
    };
    has("-S", &master) && has("-f", &config)
}

/// Sends `signal` to `pid` only while it is one of this agent's HAProxy
/// processes (a master or worker started with these paths), through a
/// pidfd: a pid remembered from an earlier poll may have been reused by
/// another process since, and that one is never hit. Returns true when the
/// signal was sent.
pub fn signal_if_ours(pid: u32, paths: &Paths, signal: Signal) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return false;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The pidfd pins the process: if the pid named ours when checked after
    // it was opened, the signal below reaches that very process.
    if !alive(pid) || !is_ours(pid, paths) {
        return false;
    }
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no
    // siginfo and no flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal as libc::c_int,
            std::ptr::null::<()>(),
            0,
        )
    };
    rc == 0
}

/// Watches a process that is not our child through a pidfd.
fn watch_foreign(pid: u32) -> io::Result<watch::Receiver<Option<Exit>>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the descriptor, so it stays open for as long
    // as it is registered.
    let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)? };
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        // A pidfd becomes readable when the process exits.
        let _ = fd.readable().await;
        let _ = tx.send(Some(Exit { status: "exited (adopted process; status unknown)".into() }));
    });
    Ok(rx)
}

/// True while `pid` runs. A zombie (exited, not yet reaped by its parent,
/// which for an adopted master is init) counts as dead.
pub fn alive(pid: u32) -> bool {
    if kill(Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => !matches!(
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()),
            Some("Z" | "X")
        ),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers as HAProxy 3.0.11 and 3.2.26 printed them.
    #[test]
    fn a_recycled_pid_is_not_signalled() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths { runtime_dir: dir.path().join("run"), state_dir: dir.path().join("state") };
        // Another process, as a recycled pid would be.
        let mut other = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!signal_if_ours(other.id(), &paths, Signal::SIGTERM));
        assert!(other.try_wait().unwrap().is_none(), "the other process was signalled");
        other.kill().unwrap();
        other.wait().unwrap();
        assert!(!signal_if_ours(other.id(), &paths, Signal::SIGTERM), "a reaped pid");
    }

    #[test]
    fn reads_the_reload_status_of_2_7_and_later() {
        let ok = "Success=1\n--\n[NOTICE]   (22324) : New worker (22331) forked\n\
                  [NOTICE]   (22324) : Loading success.\n";
        assert_eq!(parse_reload_reply(ok), ReloadReply::Loaded);
        let refused = "Success=0\n--\n[NOTICE]   (22388) : Initializing new worker (22398)\n\
            [ALERT]    (22398) : config : parsing [/run/apilb/haproxy.cfg:13] : unknown keyword 'bogus'\n\
            [ALERT]    (22398) : config : Fatal errors found in configuration.\n\
            [WARNING]  (22388) : Failed to load worker (22398) exited with code 1 (Exit)\n";
        assert_eq!(
            parse_reload_reply(refused),
            ReloadReply::Failed(vec![
                "config : parsing [/run/apilb/haproxy.cfg:13] : unknown keyword 'bogus'".into(),
                "config : Fatal errors found in configuration.".into(),
            ])
        );
        let busy = "Success=0\n--\nAnother reload is still in progress.\n";
        assert_eq!(parse_reload_reply(busy), ReloadReply::Busy);
        assert_eq!(parse_reload_reply(""), ReloadReply::Missing);
        assert_eq!(parse_reload_reply("Unknown command: 'reload'\n"), ReloadReply::Missing);
    }
}
