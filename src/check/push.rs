//! How a verdict reaches HAProxy: `set server BACKEND/SERVER health up|down`
//! on the runtime API (tests/verdict_path.rs measured it on HAProxy 2.6,
//! 3.0 and 3.2: synchronous, fires `on-marked-down shutdown-sessions`,
//! kept across reloads by the server state file, and undone by HAProxy's
//! own check when no agent is left to correct it).

use std::path::Path;
use std::time::Duration;

use crate::haproxy::cli::{self, CliError};

use super::Verdict;

/// How long one runtime command may take (the agent's poll limit).
pub const PUSH_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a verdict could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The runtime API could not be reached or did not answer.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// HAProxy answered with an error (unknown server, checks not
    /// enabled on it).
    #[error("HAProxy refused `{command}`: {reply}")]
    Refused {
        /// The command sent.
        command: String,
        /// HAProxy's answer, trimmed and cut to 200 characters.
        reply: String,
    },
}

/// The runtime API command that applies `verdict` to `backend/server`;
/// none for [`Verdict::Unknown`] (HAProxy's own state stands).
pub fn command(backend: &str, server: &str, verdict: &Verdict) -> Option<String> {
    let health = match verdict {
        Verdict::Up { .. } => "up",
        Verdict::Down(_) => "down",
        Verdict::Unknown => return None,
    };
    Some(format!("set server {backend}/{server} health {health}"))
}

/// Applies `verdict` through the admin socket at `socket`. A success
/// answers an empty line.
pub async fn apply(socket: &Path, backend: &str, server: &str, verdict: &Verdict) -> Result<(), PushError> {
    let Some(command) = command(backend, server, verdict) else {
        return Ok(());
    };
    let reply = cli::command(socket, &command, PUSH_TIMEOUT).await?;
    let reply = reply.trim();
    if reply.is_empty() {
        Ok(())
    } else {
        Err(PushError::Refused { command, reply: reply.chars().take(200).collect() })
    }
}
