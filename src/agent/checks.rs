//! The persistent checker in the agent (`health.checker: persistent`):
//! one [`Checker`] per master of the config in effect, whose verdicts the
//! agent pushes to HAProxy through the runtime API. HAProxy's own check
//! keeps running every `health.backstop_interval`, so a dead agent leaves
//! a working (slower) data plane behind.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Loaded;
use crate::check::{self, CheckError, Checker, Report, Settings, Target, Verdict};
use crate::config::{Checker as CheckerKind, Health, Timeouts};
use crate::inputs::CheckAuth;

/// What the checkers were started with: a change restarts them all.
type Key = (Health, Timeouts, CheckAuth);

/// One master's checker and the task forwarding its verdicts.
struct Running {
    /// Where it checks; a new address means a new checker.
    address: String,
    /// The checker (stops when dropped).
    checker: Checker,
    /// Forwards its verdict changes to [`Checks::next`].
    forward: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.forward.abort();
    }
}

/// The checkers of the masters in effect.
pub(super) struct Checks {
    /// The settings the running checkers use; `None` while the checker is
    /// off.
    key: Option<Key>,
    /// Shared settings and TLS client of the running checkers.
    shared: Option<(Arc<Settings>, Arc<rustls::ClientConfig>)>,
    /// Checkers by master name.
    running: HashMap<String, Running>,
    /// Where verdict changes arrive, as (master, verdict).
    rx: mpsc::Receiver<(String, Verdict)>,
    /// Cloned into each forwarding task.
    tx: mpsc::Sender<(String, Verdict)>,
}

impl Checks {
    /// No checker yet.
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::channel(64);
        Checks { key: None, shared: None, running: HashMap::new(), rx, tx }
    }

    /// True while the persistent checker decides.
    pub(super) fn active(&self) -> bool {
        self.key.is_some()
    }

    /// Starts and stops checkers to match `loaded`: none unless
    /// `health.checker` is persistent; all restarted when the check's
    /// settings or credential change; otherwise only masters that joined,
    /// left or moved. Returns the masters whose checker stopped.
    pub(super) fn sync(&mut self, loaded: &Loaded) -> Result<Vec<String>, CheckError> {
        let config = &loaded.config;
        if config.health.checker != CheckerKind::Persistent {
            self.key = None;
            self.shared = None;
            return Ok(self.running.drain().map(|(name, _)| name).collect());
        }
        let key = (config.health.clone(), config.timeouts.clone(), loaded.inputs.check.clone());
        let mut stopped = Vec::new();
        if self.key.as_ref() != Some(&key) {
            let tls = check::client_config(&loaded.inputs)?;
            let settings = Arc::new(Settings::from_config(config, &loaded.inputs));
            stopped.extend(self.running.drain().map(|(name, _)| name));
            self.shared = Some((settings, tls));
            self.key = Some(key);
        }
        let wanted: HashMap<&str, String> =
            config.masters.iter().map(|m| (m.name.as_str(), m.address.to_string())).collect();
        let gone: Vec<String> = self
            .running
            .iter()
            .filter(|(name, r)| wanted.get(name.as_str()) != Some(&r.address))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.running.remove(&name);
            stopped.push(name);
        }
        for (name, address) in wanted {
            if !self.running.contains_key(name) {
                self.start(name, address)?;
            }
        }
        stopped.retain(|n| !self.running.contains_key(n));
        Ok(stopped)
    }

    fn start(&mut self, name: &str, address: String) -> Result<(), CheckError> {
        let Some((settings, tls)) = &self.shared else { return Ok(()) };
        let target = Target { name: name.to_owned(), address: address.clone() };
        let checker = Checker::spawn(target, settings.clone(), tls.clone())?;
        let mut rx = checker.watch();
        let tx = self.tx.clone();
        let owner = name.to_owned();
        let forward = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let verdict = rx.borrow_and_update().verdict.clone();
                if tx.send((owner.clone(), verdict)).await.is_err() {
                    break;
                }
            }
        });
        self.running.insert(name.to_owned(), Running { address, checker, forward });
        Ok(())
    }

    /// The next verdict change of a running checker; pending while none
    /// runs.
    pub(super) async fn next(&mut self) -> (String, Verdict) {
        loop {
            match self.rx.recv().await {
                // A late message of a checker stopped since is dropped.
                Some((name, verdict)) if self.running.contains_key(&name) => return (name, verdict),
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    }

    /// The current report of every running checker.
    pub(super) fn reports(&self) -> Vec<Report> {
        self.running.values().map(|r| r.checker.report()).collect()
    }

    /// The current verdict on `name`, when a checker runs for it.
    pub(super) fn verdict(&self, name: &str) -> Option<Verdict> {
        self.running.get(name).map(|r| r.checker.report().verdict)
    }
}

impl super::Agent {
    /// Closes a master's established sessions unless HAProxy's own
    /// `on-marked-down shutdown-sessions` does it.
    pub(super) async fn close_sessions_of(&self, name: &str) {
        let config = &self.reconciler.applied.loaded.config;
        if !crate::render::haproxy_closes_sessions(config, self.supervisor.features()) {
            self.supervisor.close_sessions_of(name).await;
        }
    }

    /// Starts and stops checkers for the config in effect.
    pub(super) fn sync_checks(&mut self) {
        match self.checks.sync(&self.reconciler.applied.loaded) {
            Ok(stopped) => {
                for name in stopped {
                    self.observer.metrics.forget_checker(&name);
                }
            }
            Err(e) => tracing::error!(
                "cannot start the persistent checker ({e}); HAProxy's backstop check alone decides until it can"
            ),
        }
    }

    /// The checker changed its mind about `name`: tell HAProxy, and close
    /// the sessions of a master that answers badly or hangs (a crashed
    /// one's are gone already, and HAProxy may still be redispatching a
    /// connection off it).
    pub(super) async fn on_verdict(&mut self, name: &str, verdict: Verdict) {
        match &verdict {
            Verdict::Unknown => return,
            Verdict::Up { code } => {
                tracing::info!(master = name, code, "{name} is up by apilb's check (HTTP {code})")
            }
            Verdict::Down(why) => tracing::warn!(master = name, "{name} is down by apilb's check: {why}"),
        }
        self.push(name, &verdict).await;
        if let Verdict::Down(why) = &verdict
            && !matches!(why, check::Failure::Connect(_) | check::Failure::ConnectTimeout(_))
        {
            self.close_sessions_of(name).await;
        }
    }

    async fn push(&self, name: &str, verdict: &Verdict) {
        if let Err(e) = self.supervisor.set_health(name, verdict).await {
            self.observer.metrics.checker_push_errors_total.inc();
            tracing::warn!(master = name, "cannot give HAProxy the checker's verdict: {e}");
        }
    }

    /// After HAProxy restarted: every verdict the checker holds.
    pub(super) async fn push_all_verdicts(&self) {
        for report in self.checks.reports() {
            self.push(&report.name, &report.verdict).await;
        }
    }

    /// HAProxy's own check (the backstop) overruled a DOWN verdict: the
    /// checker decides while it runs, so it is said again. (An UP verdict
    /// is not forced over a failing backstop: a master that fails new TLS
    /// connections would fail clients' too.)
    pub(super) async fn reassert_verdicts(&self, stats: &crate::haproxy::stat::Stats) {
        if !self.checks.active() {
            return;
        }
        for s in stats.servers.iter().filter(|s| s.backend == crate::render::BACKEND) {
            if s.state() != crate::haproxy::stat::ServerState::Up {
                continue;
            }
            if let Some(verdict @ Verdict::Down(_)) = self.checks.verdict(&s.name) {
                tracing::info!(master = %s.name, "HAProxy's backstop check put it back in rotation; the checker says down");
                self.push(&s.name, &verdict).await;
                self.close_sessions_of(&s.name).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Paths;
    use crate::render::Features;

    fn loaded(extra: &str, masters: &str) -> Loaded {
        let yaml = format!(
            "masters: [{masters}]\nhealth:\n  tls:\n    insecure_skip_verify: true\n  auth:\n    mode: none\n{extra}"
        );
        let config = crate::config::Config::parse(&yaml, "test").expect("config parses");
        let inputs = crate::inputs::Inputs::gather(&config).expect("inputs");
        let paths = Paths::from_config(&config);
        crate::assemble(config, inputs, &paths, Features::default())
    }

    fn names(c: &Checks) -> Vec<String> {
        let mut v: Vec<String> = c.running.keys().cloned().collect();
        v.sort();
        v
    }

    /// Checkers follow the masters in effect: started for new ones,
    /// stopped for gone or moved ones, all restarted when the settings
    /// change, none with HAProxy's checker. (They check 127.0.0.1 ports
    /// nobody listens on; only which run is looked at.)
    #[tokio::test]
    async fn checkers_follow_the_masters_and_settings_in_effect() {
        let on = "  checker: persistent\n";
        let mut c = Checks::new();
        assert!(c.sync(&loaded("", "127.0.0.1:9")).expect("sync").is_empty());
        assert!(!c.active() && c.running.is_empty(), "off with checker: haproxy");

        let two = loaded(on, "127.0.0.1:9, 127.0.0.2:9");
        assert!(c.sync(&two).expect("sync").is_empty());
        assert!(c.active());
        assert_eq!(names(&c), ["127.0.0.1", "127.0.0.2"]);
        // The same config again: nothing restarts.
        assert!(c.sync(&two).expect("sync").is_empty());

        // One leaves, one joins: only those change.
        let moved = loaded(on, "127.0.0.1:9, 127.0.0.3:9");
        assert_eq!(c.sync(&moved).expect("sync"), ["127.0.0.2"]);
        assert_eq!(names(&c), ["127.0.0.1", "127.0.0.3"]);

        // A new check setting: every checker restarts (none reported
        // stopped, since each runs again).
        let slower = loaded(&format!("{on}  interval: 2s\n"), "127.0.0.1:9, 127.0.0.3:9");
        assert!(c.sync(&slower).expect("sync").is_empty());
        assert_eq!(names(&c), ["127.0.0.1", "127.0.0.3"]);
        assert_eq!(c.shared.as_ref().map(|(s, _)| s.interval), Some(std::time::Duration::from_secs(2)));

        // Back to HAProxy's check: all stop.
        let mut stopped = c.sync(&loaded("", "127.0.0.1:9")).expect("sync");
        stopped.sort();
        assert_eq!(stopped, ["127.0.0.1", "127.0.0.3"]);
        assert!(!c.active() && c.running.is_empty());
    }
}
