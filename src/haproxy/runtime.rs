//! Changing the master set of the running HAProxy through its runtime API,
//! without a reload: no old worker, and the masters that stay keep their
//! connections.
//!
//! Sequences verified on HAProxy 2.6:
//!
//! - **add**: `add server` (it starts in maintenance) for the checked server
//!   and its fail-open twin, `enable health`, wait for the first check
//!   result, then `enable server`. Enabling before a check would put the
//!   master in rotation unchecked.
//! - **remove**: `set server … state drain` (no new connections; the
//!   existing ones finish), and later, when it has no sessions left or the
//!   drain limit passed, `disable server`, `shutdown sessions server`,
//!   `del server` (which needs maintenance and no sessions).
//!
//! `add server` only accepts a CA and a client certificate that the running
//! config already loads; every master shares them, so they are loaded.
//!
//! Newer versions, detected from the running master (checked on 2.6, 3.0
//! and 3.2):
//!
//! - 3.1+: `add server … init-state down` keeps the new master out of
//!   rotation until a check passes, so it is enabled at once instead of
//!   after a bounded wait for its first check (which, on 2.6 to 3.0, lets
//!   a master whose first check outlasts the wait in unchecked).
//! - 3.0+: `wait <ms> srv-removable` before `del server`, which in 3.3 no
//!   longer closes idle connections itself and may otherwise fail.

use std::time::Duration;

use tokio::time::{Instant, sleep};

use super::stat;
use super::supervisor::{Haproxy, SupervisorError};
use crate::config::Master;
use crate::render::{BACKEND, CheckPlan, FALLBACK_SUFFIX, fallback_params, server_params};

/// How long `del server` may wait for a server's last connections to be
/// released (3.0+), in milliseconds.
const REMOVABLE_WAIT_MS: u32 = 2000;

/// A runtime change that HAProxy refused.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The command was answered with an error.
    #[error("`{command}`: {answer}")]
    Refused {
        /// The command, e.g. `add server masters/10.0.0.4 …`.
        command: String,
        /// HAProxy's answer.
        answer: String,
    },
    /// The socket failed.
    #[error(transparent)]
    Socket(#[from] SupervisorError),
    /// No HAProxy master runs to take the command (it died and is being
    /// restarted).
    #[error("HAProxy is not running")]
    NotRunning,
}

/// The difference between two master sets, by name and address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Masters to add.
    pub added: Vec<Master>,
    /// Names of masters to remove.
    pub removed: Vec<String>,
}

impl Change {
    /// Masters added or removed.
    pub fn len(&self) -> usize {
        self.added.len() + self.removed.len()
    }
    /// True when nothing changes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What changes from `old` to `new`. A master whose address changed under
/// the same name is removed and added.
pub fn diff(old: &[Master], new: &[Master]) -> Change {
    Change {
        added: new.iter().filter(|m| !old.contains(m)).cloned().collect(),
        removed: old.iter().filter(|m| !new.contains(m)).map(|m| m.name.clone()).collect(),
    }
}

/// Runs a command that answers nothing on success.
async fn quiet(h: &Haproxy, command: String) -> Result<(), RuntimeError> {
    let answer = h.runtime(&command).await?;
    if answer.trim().is_empty() {
        Ok(())
    } else {
        Err(RuntimeError::Refused { command, answer: answer.trim().to_owned() })
    }
}

/// Runs a command whose success answer contains `ok`.
async fn expect(h: &Haproxy, command: String, ok: &str) -> Result<(), RuntimeError> {
    let answer = h.runtime(&command).await?;
    if answer.contains(ok) {
        Ok(())
    } else {
        Err(RuntimeError::Refused { command, answer: answer.trim().to_owned() })
    }
}

/// Adds masters with exactly the parameters of the rendered config and puts
/// them in rotation once their first check has run (at most `wait`). A
/// master that fails that check enters as DOWN and gets no traffic.
pub async fn add(
    h: &Haproxy,
    plan: &CheckPlan,
    masters: &[Master],
    wait: Duration,
) -> Result<(), RuntimeError> {
    if masters.is_empty() {
        return Ok(());
    }
    let init_state = h.version().add_server_init_state();
    for m in masters {
        let mut params = server_params(plan, m);
        if init_state {
            params.push_str(" init-state down");
        }
        expect(h, format!("add server {BACKEND}/{} {} {params}", m.name, m.address), "New server registered")
            .await?;
        let twin = format!("{}{FALLBACK_SUFFIX}", m.name);
        expect(
            h,
            format!("add server {BACKEND}/{twin} {} {}", m.address, fallback_params(m)),
            "New server registered",
        )
        .await?;
        quiet(h, format!("enable health {BACKEND}/{}", m.name)).await?;
    }
    // The first check runs while the server is still in maintenance.
    let deadline = Instant::now() + wait;
    while !init_state && Instant::now() < deadline {
        let stats = h.show_stat().await?;
        let checked = masters.iter().all(|m| {
            stats.servers.iter().any(|s| {
                s.backend == BACKEND
                    && s.name == m.name
                    && !s.check_status.is_empty()
                    && s.check_status != "INI"
            })
        });
        if checked {
            break;
        }
        sleep(Duration::from_millis(25)).await;
    }
    for m in masters {
        quiet(h, format!("enable server {BACKEND}/{}", m.name)).await?;
        quiet(h, format!("enable server {BACKEND}/{}{FALLBACK_SUFFIX}", m.name)).await?;
    }
    Ok(())
}

/// Stops sending new connections to a master (and its twin); its
/// established connections go on.
pub async fn drain(h: &Haproxy, name: &str) -> Result<(), RuntimeError> {
    quiet(h, format!("set server {BACKEND}/{name} state drain")).await?;
    quiet(h, format!("set server {BACKEND}/{name}{FALLBACK_SUFFIX} state drain")).await
}

/// Puts a draining master back in service (it came back before it was
/// deleted).
pub async fn undrain(h: &Haproxy, name: &str) -> Result<(), RuntimeError> {
    quiet(h, format!("set server {BACKEND}/{name} state ready")).await?;
    quiet(h, format!("set server {BACKEND}/{name}{FALLBACK_SUFFIX} state ready")).await
}

/// Deletes a master and its twin, closing whatever sessions remain.
/// A master that no longer exists (HAProxy restarted) is not an error.
pub async fn delete(h: &Haproxy, name: &str) -> Result<(), RuntimeError> {
    for server in [name.to_owned(), format!("{name}{FALLBACK_SUFFIX}")] {
        let answer = h.runtime(&format!("disable server {BACKEND}/{server}")).await?;
        if answer.contains("No such server") {
            continue;
        }
        quiet(h, format!("shutdown sessions server {BACKEND}/{server}")).await?;
        if h.version().wait_srv_removable() {
            expect(h, format!("wait {REMOVABLE_WAIT_MS} srv-removable {BACKEND}/{server}"), "Done").await?;
        }
        expect(h, format!("del server {BACKEND}/{server}"), "Server deleted").await?;
    }
    Ok(())
}

/// Closes the established sessions of a master marked DOWN, as
/// `on-marked-down shutdown-sessions` does where it is safe (see
/// [`crate::render::Features`]); sessions still connecting are left to
/// fail over by themselves. Returns how many were closed.
pub async fn close_established(h: &Haproxy, name: &str) -> Result<usize, RuntimeError> {
    let sessions = stat::established_sessions(&h.runtime("show sess").await?, BACKEND, name);
    for id in &sessions {
        // A session that ended in between answers an error; nothing to do.
        h.runtime(&format!("shutdown session {id}")).await?;
    }
    Ok(sessions.len())
}
