//! HAProxy's stdout and stderr, read by apilb.
//!
//! HAProxy's master writes its events (reloads, "Loading failure!" with the
//! reason, worker exits) only to its stderr, and the worker writes server
//! state changes there too. apilb hands HAProxy the write end of a FIFO in
//! the runtime directory instead of a pipe: a pipe dies with the agent,
//! whereas a restarted agent reopens the FIFO and keeps reading (HAProxy
//! ignores SIGPIPE, so writes in between are simply lost). The write end is
//! non-blocking, so HAProxy can never stall on a slow or stopped reader.
//!
//! Every line is logged under the `haproxy` target at HAProxy's severity,
//! with secrets redacted, and the last lines are kept so a failed start or
//! reload can be reported with HAProxy's own reason.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::render::Redactor;

/// How many recent lines are kept for error reports.
const KEEP: usize = 200;

/// Mark-down events waiting for the agent.
const MARKED_DOWN_QUEUE: usize = 64;

/// HAProxy's severity tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// `[ALERT]` and `[EMERG]`.
    Alert,
    /// `[WARNING]`.
    Warning,
    /// `[NOTICE]`, `[INFO]` and untagged lines.
    Notice,
}

/// One line of HAProxy output.
#[derive(Clone, Debug)]
pub struct Line {
    /// When apilb read it.
    pub at: Instant,
    /// HAProxy's severity tag.
    pub severity: Severity,
    /// The pid HAProxy printed, when any.
    pub pid: Option<u32>,
    /// The message, secrets redacted.
    pub message: String,
}

/// Parses `[ALERT]    (1484) : config : parsing …`.
pub fn parse_line(raw: &str) -> (Severity, Option<u32>, &str) {
    let raw = raw.trim_end();
    let Some(rest) = raw.strip_prefix('[') else {
        return (Severity::Notice, None, raw);
    };
    let Some((tag, rest)) = rest.split_once(']') else {
        return (Severity::Notice, None, raw);
    };
    let severity = match tag {
        "ALERT" | "EMERG" => Severity::Alert,
        "WARNING" => Severity::Warning,
        _ => Severity::Notice,
    };
    let rest = rest.trim_start();
    let (pid, msg) = match rest.strip_prefix('(').and_then(|r| r.split_once(')')) {
        Some((pid, msg)) => (pid.trim().parse().ok(), msg.trim_start().trim_start_matches(':').trim_start()),
        None => (None, rest),
    };
    (severity, pid, msg)
}

/// The server named by `Server <backend>/<server> is DOWN, reason: …`,
/// the line a worker prints the instant a check marks a server down.
pub fn marked_down(message: &str) -> Option<(&str, &str)> {
    let (server, rest) = message.strip_prefix("Server ")?.split_once(' ')?;
    if !(rest == "is DOWN" || rest.starts_with("is DOWN,")) {
        return None;
    }
    server.split_once('/')
}

/// The FIFO and the task reading it.
pub struct Output {
    /// The FIFO, for new HAProxy processes' stdout and stderr.
    path: PathBuf,
    /// The last lines, for error reports.
    recent: Arc<Mutex<VecDeque<Line>>>,
    /// Secrets to remove from every line.
    redactor: Arc<RwLock<Redactor>>,
    /// Servers marked DOWN, as HAProxy reports them, for the agent to react
    /// at once (taken once by [`Output::marked_down_events`]).
    marked_down: Mutex<Option<mpsc::Receiver<(String, String)>>>,
    /// The reader.
    task: tokio::task::JoinHandle<()>,
}

impl Output {
    /// Creates the FIFO (0600) if needed and starts reading it.
    pub fn open(path: &Path) -> io::Result<Output> {
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_fifo() => {}
            Ok(_) => {
                std::fs::remove_file(path)?;
                mkfifo(path)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => mkfifo(path)?,
            Err(e) => return Err(e),
        }
        // Read-write: the reader never sees EOF when HAProxy restarts.
        let receiver = pipe::OpenOptions::new().read_write(true).open_receiver(path)?;
        let recent = Arc::new(Mutex::new(VecDeque::with_capacity(KEEP)));
        let redactor = Arc::new(RwLock::new(Redactor::default()));
        let (events, marked_down) = mpsc::channel(MARKED_DOWN_QUEUE);
        let task = tokio::spawn(read(receiver, recent.clone(), redactor.clone(), events));
        Ok(Output {
            path: path.to_owned(),
            recent,
            redactor,
            marked_down: Mutex::new(Some(marked_down)),
            task,
        })
    }

    /// The (backend, server) pairs HAProxy reports marked DOWN, as they
    /// come. `None` after the first call. When the receiver lags, events
    /// are dropped: it is a shortcut, the agent's poll sees states anyway.
    pub fn marked_down_events(&self) -> Option<mpsc::Receiver<(String, String)>> {
        self.marked_down.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// A non-blocking write end for a new HAProxy's stdout or stderr.
    pub fn writer(&self) -> io::Result<OwnedFd> {
        let file = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&self.path)?;
        Ok(file.into())
    }

    /// Replaces the secrets redacted from HAProxy's output.
    pub fn set_redactor(&self, redactor: Redactor) {
        *self.redactor.write().unwrap_or_else(|e| e.into_inner()) = redactor;
    }

    /// `text` with the current secrets removed.
    pub fn redact(&self, text: &str) -> String {
        self.redactor.read().unwrap_or_else(|e| e.into_inner()).redact(text)
    }

    /// Lines read at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Line> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().filter(|l| l.at >= since).cloned().collect()
    }

    /// The `[ALERT]` messages read at or after `since`, joined for an error
    /// message.
    pub fn alerts_since(&self, since: Instant) -> String {
        self.since(since)
            .into_iter()
            .filter(|l| l.severity == Severity::Alert)
            .map(|l| l.message)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn mkfifo(path: &Path) -> io::Result<()> {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(io::Error::from)
}

async fn read(
    receiver: pipe::Receiver,
    recent: Arc<Mutex<VecDeque<Line>>>,
    redactor: Arc<RwLock<Redactor>>,
    marked_down_tx: mpsc::Sender<(String, String)>,
) {
    let mut lines = BufReader::new(receiver).lines();
    loop {
        let raw = match lines.next_line().await {
            Ok(Some(raw)) => raw,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read HAProxy's output");
                break;
            }
        };
        if raw.trim().is_empty() {
            continue;
        }
        let (severity, pid, msg) = parse_line(&raw);
        if let Some((backend, server)) = marked_down(msg) {
            let _ = marked_down_tx.try_send((backend.to_owned(), server.to_owned()));
        }
        let message = redactor.read().unwrap_or_else(|e| e.into_inner()).redact(msg);
        match severity {
            Severity::Alert => tracing::error!(target: "haproxy", pid, "{message}"),
            Severity::Warning => tracing::warn!(target: "haproxy", pid, "{message}"),
            Severity::Notice => tracing::info!(target: "haproxy", pid, "{message}"),
        }
        let mut recent = recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == KEEP {
            recent.pop_front();
        }
        recent.push_back(Line { at: Instant::now(), severity, pid, message });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tagged_and_raw_lines() {
        let (s, pid, m) = parse_line("[ALERT]    (1484) : config : parsing [c.cfg:13] : bad");
        assert_eq!((s, pid, m), (Severity::Alert, Some(1484), "config : parsing [c.cfg:13] : bad"));
        let (s, pid, m) = parse_line("[NOTICE]   (24050) : New worker (24053) forked");
        assert_eq!((s, pid, m), (Severity::Notice, Some(24050), "New worker (24053) forked"));
        assert_eq!(parse_line("[WARNING]  (7) : x").0, Severity::Warning);
        assert_eq!(parse_line("plain text"), (Severity::Notice, None, "plain text"));
    }

    #[test]
    fn recognises_a_mark_down() {
        let (_, _, m) = parse_line(
            "[WARNING]  (8958) : Server masters/master-2 is DOWN, reason: Layer4 connection problem, info: \
             \"Connection refused\", check duration: 0ms. 2 active and 3 backup servers left.",
        );
        assert_eq!(marked_down(m), Some(("masters", "master-2")));
        assert_eq!(marked_down("Server masters/master-2 is going DOWN for maintenance."), None);
        assert_eq!(marked_down("Server masters/master-2 is UP, reason: Layer7 check passed"), None);
        assert_eq!(marked_down("Server b/s2 is DOWN/READY (leaving forced maintenance)."), None);
    }
}
