//! The seam between the agent's decisions and HAProxy: everything the
//! [`Reconciler`](super::reconcile::Reconciler) asks of the data plane.
//!
//! The live implementation is [`Supervisor`](super::supervise::Supervisor),
//! which runs the real binary and talks to the real sockets. The
//! reconciler's unit tests drive a scripted fake instead, so that refusal,
//! rollback, runtime changes and reload fallbacks are decided and tested
//! without a process. Integration tests (tests/) always run the real
//! HAProxy.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Master;
use crate::haproxy::BinaryError;
use crate::haproxy::runtime::RuntimeError;
use crate::haproxy::stat::ProcInfo;
use crate::haproxy::supervisor::{ReloadError, SupervisorError};
use crate::render::{CheckPlan, Redactor, Rendered};

/// What the reconciler needs from HAProxy. Used generically inside the
/// crate (never as `dyn`), so its `async fn`s need no boxing.
pub(crate) trait DataPlane {
    /// Writes `rendered` to the staging file and validates it with
    /// `haproxy -c`; returns the staging path. A refused file is removed.
    async fn validate(&self, rendered: &Rendered) -> Result<PathBuf, BinaryError>;

    /// True while an HAProxy master runs; when none does (it died and is
    /// being restarted), a change is only put in place for its next start.
    fn is_running(&self) -> bool;

    /// Writes the server-state file the next worker loads, so a reload
    /// keeps every master's health.
    async fn save_server_state(&self) -> Result<(), SupervisorError>;

    /// Reloads the master onto the file in place and waits for the
    /// outcome, the way the running version reports it.
    async fn reload(&self) -> Result<ProcInfo, ReloadError>;

    /// Which secrets to remove from HAProxy's messages from now on.
    fn set_redactor(&self, redactor: &Redactor);

    /// Adds checked servers (and their fail-open twins) at run time, and
    /// enables them once their first check has run (`wait` at most).
    async fn add_servers(
        &self,
        plan: &CheckPlan,
        masters: &[Master],
        wait: Duration,
    ) -> Result<(), RuntimeError>;

    /// Puts a removed master in drain: it keeps its sessions, gets no new
    /// ones.
    async fn drain(&self, name: &str) -> Result<(), RuntimeError>;

    /// Brings a draining master back into rotation.
    async fn undrain(&self, name: &str) -> Result<(), RuntimeError>;

    /// Deletes a drained master (and its twin).
    async fn delete(&self, name: &str) -> Result<(), RuntimeError>;
}
