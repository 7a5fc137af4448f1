//! The HAProxy process: the one master the agent started or adopted, its
//! restart with backoff when it dies, and the live [`DataPlane`].

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::{Instant, sleep};

use super::plane::DataPlane;
use crate::backoff::Backoff;
use crate::check::Verdict;
use crate::check::push::PushError;
use crate::config::Master;
use crate::haproxy::output::Output;
use crate::haproxy::runtime::{self, RuntimeError};
use crate::haproxy::stat::{ProcInfo, Stats};
use crate::haproxy::supervisor::{
    Exit, Haproxy, ReloadError, SupervisorError, alive, is_ours, signal_if_ours,
};
use crate::haproxy::{Binary, BinaryError, Version};
use crate::layout::Paths;
use crate::render::{BACKEND, CheckPlan, Features, Redactor, Rendered};

/// When to try restarting a dead HAProxy: the decision alone, so it is
/// unit-tested under paused time. The delays are [`Backoff::respawn`]'s.
#[derive(Debug)]
pub(super) struct Respawn {
    /// The schedule: at once, then slower while HAProxy keeps dying; from
    /// zero again once it ran stably.
    backoff: Backoff,
    /// When the next attempt is due, while HAProxy is down.
    pub(super) at: Option<Instant>,
}

impl Default for Respawn {
    fn default() -> Self {
        Respawn { backoff: Backoff::respawn(), at: None }
    }
}

impl Respawn {
    /// HAProxy died after running for `ran`: schedules the first attempt
    /// (at once, unless it keeps dying) and returns its delay.
    pub(super) fn died(&mut self, ran: Duration) -> Duration {
        self.backoff.reset_if_stable(ran);
        self.schedule()
    }

    /// An attempt starts now.
    pub(super) fn attempting(&mut self) {
        self.at = None;
    }

    /// The attempt failed: schedules the next one and returns its delay.
    pub(super) fn failed(&mut self) -> Duration {
        self.schedule()
    }

    fn schedule(&mut self) -> Duration {
        let delay = self.backoff.next_delay();
        self.at = Some(Instant::now() + delay);
        delay
    }
}

/// Owns the HAProxy master and everything needed to start another.
pub(super) struct Supervisor {
    /// The binary on disk: validates every render and starts a new master.
    pub(super) binary: Binary,
    /// The binary's version, for a master started from it.
    version: Version,
    /// Where the config, sockets and pidfile live.
    paths: Paths,
    /// HAProxy's stdout/stderr, shared by every master it starts.
    pub(super) output: Output,
    /// The master, while one runs.
    haproxy: Option<Haproxy>,
    /// When the master started, to tell a crash loop from a rare death.
    started_at: Instant,
    /// The restart schedule while no master runs.
    pub(super) respawn: Respawn,
    /// Worker pids of the last poll: after the master died, its workers
    /// are waited for (they free the port) and stopped if they linger.
    workers_seen: Vec<u32>,
}

impl Supervisor {
    /// Supervises `haproxy`, started or adopted.
    pub(super) fn new(
        binary: Binary,
        version: Version,
        paths: Paths,
        output: Output,
        haproxy: Haproxy,
    ) -> Self {
        Supervisor {
            binary,
            version,
            paths,
            output,
            haproxy: Some(haproxy),
            started_at: Instant::now(),
            respawn: Respawn::default(),
            workers_seen: Vec::new(),
        }
    }

    /// The master, while one runs.
    pub(super) fn haproxy(&self) -> Option<&Haproxy> {
        self.haproxy.as_ref()
    }

    /// Takes the master out (graceful shutdown stops it).
    pub(super) fn take(&mut self) -> Option<Haproxy> {
        self.haproxy.take()
    }

    /// What the HAProxy that runs (or, while none runs, the binary that
    /// will) handles: renders follow it, so after a reload re-executes a
    /// newer binary the next render adapts, and is applied like any change.
    pub(super) fn features(&self) -> Features {
        self.haproxy.as_ref().map_or_else(|| self.version.features(), |h| h.version().features())
    }

    /// Waits until the master exits; pending while none runs.
    pub(super) async fn exited(&self) -> Exit {
        match &self.haproxy {
            Some(h) => h.exited().await,
            None => std::future::pending().await,
        }
    }

    /// Waits until a restart is due; pending while a master runs.
    pub(super) async fn respawn_due(&self) {
        match self.respawn.at {
            Some(at) if self.haproxy.is_none() => tokio::time::sleep_until(at).await,
            _ => std::future::pending().await,
        }
    }

    /// The master died: forgets it and schedules its restart. Returns the
    /// delay.
    pub(super) fn died(&mut self) -> Duration {
        self.haproxy = None;
        self.respawn.died(self.started_at.elapsed())
    }

    /// Remembers the workers of the last poll.
    pub(super) fn saw_workers(&mut self, proc: &ProcInfo) {
        self.workers_seen = proc.workers.iter().chain(&proc.old_workers).map(|w| w.pid).collect();
    }

    /// Starts a new master on the config in place, after the dead one's
    /// workers are gone. On failure the next attempt is scheduled; its
    /// delay is in the error.
    pub(super) async fn respawn(&mut self) -> Result<u32, (SupervisorError, Duration)> {
        self.respawn.attempting();
        // The dead master's workers exit within milliseconds; wait for
        // them so the new master can bind the port. The pids are from the
        // last poll: only processes that still run our HAProxy count, and
        // only those are signalled.
        let ours = |pid: &u32| alive(*pid) && is_ours(*pid, &self.paths);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.workers_seen.iter().any(ours) && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        for pid in std::mem::take(&mut self.workers_seen) {
            if signal_if_ours(pid, &self.paths, Signal::SIGTERM) {
                tracing::warn!(pid, "terminated a worker orphaned by the dead master");
            }
        }
        match Haproxy::spawn(&self.binary, &self.version, &self.paths, &self.output).await {
            Ok(h) => {
                let pid = h.pid();
                self.started_at = Instant::now();
                self.haproxy = Some(h);
                Ok(pid)
            }
            Err(e) => Err((e, self.respawn.failed())),
        }
    }

    /// `show proc` and `show stat`, each within `limit`.
    pub(super) async fn poll(
        &self,
        limit: Duration,
    ) -> Option<(Result<ProcInfo, SupervisorError>, Result<Stats, SupervisorError>)> {
        let h = self.haproxy.as_ref()?;
        Some(tokio::join!(h.show_proc_within(limit), h.show_stat_within(limit)))
    }

    /// Closes the established sessions of a master marked DOWN, for when
    /// HAProxy's own `on-marked-down shutdown-sessions` is not rendered
    /// ([`crate::render::haproxy_closes_sessions`]). Their clients
    /// reconnect at once, to healthy masters.
    pub(super) async fn close_sessions_of(&self, name: &str) {
        let Some(h) = &self.haproxy else { return };
        match runtime::close_established(h, name).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(master = name, sessions = n, "closed the sessions of a master marked DOWN")
            }
            Err(e) => tracing::warn!(master = name, "cannot close the sessions of a master marked DOWN: {e}"),
        }
    }

    /// Applies the persistent checker's verdict on `name` (`set server …
    /// health up|down`); nothing while no master runs (the next one is
    /// told when it starts).
    pub(super) async fn set_health(&self, name: &str, verdict: &Verdict) -> Result<(), PushError> {
        if self.haproxy.is_none() {
            return Ok(());
        }
        crate::check::push::apply(&self.paths.stats_socket(), BACKEND, name, verdict).await
    }

    fn running(&self) -> Result<&Haproxy, RuntimeError> {
        self.haproxy.as_ref().ok_or(RuntimeError::NotRunning)
    }
}

impl DataPlane for Supervisor {
    async fn validate(&self, rendered: &Rendered) -> Result<PathBuf, BinaryError> {
        let staging = self.paths.staging_config();
        let result = self.binary.validate_at(rendered, &self.paths, &staging).await;
        if result.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        for w in result? {
            tracing::warn!(target: "haproxy", "{}", rendered.redact(&w));
        }
        Ok(staging)
    }

    fn is_running(&self) -> bool {
        self.haproxy.is_some()
    }

    async fn save_server_state(&self) -> Result<(), SupervisorError> {
        match &self.haproxy {
            Some(h) => h.save_server_state().await,
            None => Ok(()),
        }
    }

    async fn reload(&self) -> Result<ProcInfo, ReloadError> {
        match &self.haproxy {
            Some(h) => h.reload(&self.output).await,
            // The reconciler asks only while one runs (`is_running`).
            None => Err(ReloadError::Unconfirmed("HAProxy is not running".into())),
        }
    }

    fn set_redactor(&self, redactor: &Redactor) {
        self.output.set_redactor(redactor.clone());
    }

    async fn add_servers(
        &self,
        plan: &CheckPlan,
        masters: &[Master],
        wait: Duration,
    ) -> Result<(), RuntimeError> {
        runtime::add(self.running()?, plan, masters, wait).await
    }

    async fn drain(&self, name: &str) -> Result<(), RuntimeError> {
        runtime::drain(self.running()?, name).await
    }

    async fn undrain(&self, name: &str) -> Result<(), RuntimeError> {
        runtime::undrain(self.running()?, name).await
    }

    async fn delete(&self, name: &str) -> Result<(), RuntimeError> {
        runtime::delete(self.running()?, name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn respawn_backs_off_and_starts_over_after_a_stable_run() {
        let mut r = Respawn::default();
        // A master that dies quickly: at once, then slower and slower.
        assert_eq!(r.died(Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(r.at, Some(Instant::now()));
        let mut delays = Vec::new();
        for _ in 0..9 {
            r.attempting();
            assert_eq!(r.at, None);
            delays.push(r.failed());
        }
        assert_eq!(
            delays[..3],
            [Duration::from_millis(100), Duration::from_millis(250), Duration::from_millis(500)]
        );
        assert_eq!(delays[8], Duration::from_secs(10), "capped");
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        // Started, died again quickly: the backoff goes on.
        r.attempting();
        assert_eq!(r.died(Duration::from_secs(29)), Duration::from_secs(10));
        // Ran stably before dying: at once again.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(r.died(Duration::from_secs(30)), Duration::ZERO);
        assert_eq!(r.at, Some(Instant::now()));
    }
}
