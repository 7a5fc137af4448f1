//! One-shot commands on HAProxy's unix sockets: the master CLI (`-S`) and
//! the worker's admin stats socket (the runtime API).
//!
//! Each command opens a connection, writes the command, half-closes (the
//! master CLI keeps the connection open until the client does) and reads
//! the answer to EOF. The master socket refuses connections for ~50-100 ms
//! while the master re-executes on reload, so connecting is retried until
//! the deadline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{Instant, sleep, timeout_at};

/// How long one command may take, connection retries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the agent's periodic poll (`show proc`, `show stat`) waits for
/// an answer. HAProxy answers these in a millisecond or two, even busy
/// (the master does no proxying; a worker answers between events), so a
/// longer silence means a frozen or dead process: it is reported at the
/// next poll instead of [`DEFAULT_TIMEOUT`] later, and the agent's loop,
/// which waits for the poll, is never held for seconds. Adoption and
/// reload confirmation keep their own, longer limits.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(500);

/// Failures of a socket command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Nothing accepted the connection before the deadline.
    #[error("cannot connect to HAProxy socket {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The last connection error.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("HAProxy socket {}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer before the deadline.
    #[error("HAProxy socket {} did not answer `{command}` within {limit:?}", path.display())]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The command sent.
        command: String,
        /// The deadline.
        limit: Duration,
    },
}

/// Sends `command` to the socket at `path` and returns the whole answer.
pub async fn command(path: &Path, command: &str, limit: Duration) -> Result<String, CliError> {
    let deadline = Instant::now() + limit;
    let exchange = async {
        let mut stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() + Duration::from_millis(20) >= deadline => {
                    return Err(CliError::Connect { path: path.to_owned(), source: e });
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
                {
                    sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(CliError::Connect { path: path.to_owned(), source: e });
                }
            }
        };
        let io = |source| CliError::Io { path: path.to_owned(), source };
        stream.write_all(format!("{command}\n").as_bytes()).await.map_err(io)?;
        stream.shutdown().await.map_err(io)?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.map_err(io)?;
        Ok(answer)
    };
    timeout_at(deadline, exchange).await.unwrap_or_else(|_| {
        Err(CliError::Timeout { path: path.to_owned(), command: command.to_owned(), limit })
    })
}
