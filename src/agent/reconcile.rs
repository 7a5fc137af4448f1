//! The reconciler: turns the desired config and what HAProxy runs into an
//! [`Outcome`]. It decides when a change is applied (two reads agree, not
//! refused before), applies it through the [`DataPlane`] (validate → save
//! server state → atomic rename → reload → confirm, or servers added and
//! drained at run time) and rolls back on any failure, so HAProxy only ever
//! runs a config `haproxy -c` accepted and the file on disk matches it.
//!
//! It reports outcomes; logging, metrics and status are the observer's
//! (like vector's reload controller, which returns an outcome and leaves
//! the running topology to others).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::diff::{self, Plan};
use super::plane::DataPlane;
use crate::config::Master;
use crate::haproxy::BinaryError;
use crate::haproxy::runtime::{Change, RuntimeError};
use crate::haproxy::stat::Stats;
use crate::haproxy::supervisor::ReloadError;
use crate::inputs::Secret;
use crate::layout::Paths;
use crate::render::{CheckPlan, FALLBACK_SUFFIX, Features, Redactor};
use crate::status::ReloadResult;
use crate::{LoadError, Loaded, fsutil};

/// The haproxy.cfg HAProxy runs, to restore it if a reload fails.
pub(super) struct Running {
    /// The config it was rendered from, when known: an adopted master
    /// running an older config is known by its text alone. A change of
    /// servers at run time is only made against a known config.
    pub(super) loaded: Option<Loaded>,
    /// The file's text, secrets included.
    pub(super) text: Secret,
    /// Its [`crate::render::Rendered::fingerprint`]: what a new render is
    /// compared with.
    pub(super) fingerprint: String,
    /// Its [`crate::render::Rendered::hash`], for logs.
    pub(super) hash: String,
    /// Its secrets, to keep them out of HAProxy's messages.
    pub(super) redactor: Redactor,
}

impl Running {
    /// The config HAProxy runs once `loaded` is applied.
    pub(super) fn of(loaded: &Loaded) -> Running {
        let r = &loaded.rendered;
        Running {
            loaded: Some(loaded.clone()),
            text: r.text.clone(),
            fingerprint: r.fingerprint.clone(),
            hash: r.hash.clone(),
            redactor: r.redactor.clone(),
        }
    }

    /// An adopted master that runs `text` (fingerprint `fingerprint`), not
    /// the config this agent rendered.
    pub(super) fn adopted(text: String, fingerprint: String, redactor: Redactor) -> Running {
        Running { loaded: None, text: Secret::new(text), fingerprint, hash: "(adopted)".into(), redactor }
    }
}

/// The config in effect.
pub(super) struct Applied {
    /// The config, its files and its render.
    pub(super) loaded: Loaded,
    /// When it took effect.
    pub(super) at: SystemTime,
}

impl Applied {
    /// `loaded`, in effect from now.
    pub(super) fn now(loaded: Loaded) -> Applied {
        Applied { loaded, at: SystemTime::now() }
    }
}

/// Why a change was not applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    /// The label for metrics and status.
    pub(super) result: ReloadResult,
    /// What to tell the operator.
    pub(super) message: String,
    /// Report it even when the same message was reported last (an explicit
    /// request, or an attempt that really failed); a file that stays
    /// invalid is reported once.
    pub(super) always: bool,
}

/// How an attempt to change the config ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// HAProxy runs the new config (or will at its next start, while it is
    /// being restarted).
    Applied {
        /// Settings that discovery depends on changed: restart it.
        discovery_changed: bool,
    },
    /// Nothing changed in what HAProxy runs.
    NotApplied(Refusal),
}

/// What to do after reading the config file.
#[derive(Debug)]
pub(super) enum Step {
    /// Nothing: no change, one refused before, or a change seen once that
    /// waits for a second read to agree.
    Wait,
    /// The file describes the config in effect (again).
    InEffect,
    /// Apply this change (boxed: a config is large, the other steps tiny).
    Apply(Box<Loaded>),
    /// The file cannot be used.
    Invalid(Refusal),
}

/// A render that passed `haproxy -c`, in the staging file.
pub(super) struct Staged {
    /// The config.
    loaded: Loaded,
    /// The staging file.
    path: PathBuf,
}

/// A file of the runtime directory that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub(crate) struct FileError {
    /// The file.
    pub(crate) path: PathBuf,
    /// The I/O error.
    #[source]
    pub(crate) source: std::io::Error,
}

/// Why servers could not be changed at run time (a reload follows).
#[derive(Debug, thiserror::Error)]
pub(super) enum RuntimeChangeError {
    /// The new file did not validate.
    #[error(transparent)]
    Invalid(#[from] BinaryError),
    /// A runtime command failed.
    #[error(transparent)]
    Command(#[from] RuntimeError),
    /// The new file could not be put in place.
    #[error(transparent)]
    File(#[from] FileError),
}

/// Renames the validated staging file over the config HAProxy runs and
/// records its fingerprint for the next agent's adoption.
pub(super) fn promote(paths: &Paths, staging: &std::path::Path, loaded: &Loaded) -> Result<(), FileError> {
    let target = paths.config_file();
    std::fs::rename(staging, &target).map_err(|source| FileError { path: target.clone(), source })?;
    let marker = paths.applied_marker();
    fsutil::write_atomic(&marker, loaded.rendered.fingerprint.as_bytes(), 0o600)
        .map_err(|source| FileError { path: marker, source })
}

/// Owns the desired and the running config, and changes one into the other.
pub(super) struct Reconciler {
    /// Where the config, its marker and the check files live.
    paths: Paths,
    /// apilb.yaml, named in messages.
    config_path: PathBuf,
    /// The config in effect.
    pub(super) applied: Applied,
    /// What HAProxy runs (differs from `applied` only after adopting a
    /// master whose config could not be updated).
    pub(super) running: Running,
    /// A changed render seen once, applied when the next read agrees.
    candidate: Option<String>,
    /// The fingerprint of the last render HAProxy refused; not retried
    /// until it changes (or on SIGHUP).
    refused: Option<String>,
    /// Removed masters still draining: name → when they are deleted
    /// whatever their sessions.
    pub(super) draining: HashMap<String, Instant>,
}

impl Reconciler {
    /// Reconciles towards `applied`, starting from `running`.
    pub(super) fn new(paths: Paths, config_path: PathBuf, applied: Applied, running: Running) -> Self {
        Reconciler {
            paths,
            config_path,
            applied,
            running,
            candidate: None,
            refused: None,
            draining: HashMap::new(),
        }
    }

    /// The periodic read of the config file: a change is applied once two
    /// consecutive reads agree (a file caught mid-write is not), and only
    /// while HAProxy `answers` (a frozen or overloaded master would hold a
    /// reload up; the change waits for it).
    pub(super) fn on_read(&mut self, read: Result<Loaded, LoadError>, answers: bool) -> Step {
        let loaded = match read {
            Ok(l) => l,
            Err(e) => {
                self.candidate = None;
                return Step::Invalid(Refusal {
                    result: ReloadResult::InvalidConfig,
                    message: e.to_string(),
                    always: false,
                });
            }
        };
        let hash = &loaded.rendered.fingerprint;
        if self.refused.as_ref() == Some(hash) {
            self.candidate = None;
            Step::Wait
        } else if *hash == self.running.fingerprint {
            self.candidate = None;
            Step::InEffect
        } else if self.candidate.as_ref() == Some(hash) {
            if !answers {
                return Step::Wait;
            }
            self.candidate = None;
            Step::Apply(Box::new(loaded))
        } else {
            self.candidate = Some(hash.clone());
            Step::Wait
        }
    }

    /// SIGHUP: the file as it is now, without waiting for it to settle,
    /// even if it was refused before.
    pub(super) fn on_reload_request(&mut self, read: Result<Loaded, LoadError>) -> Step {
        match read {
            Ok(loaded) if loaded.rendered.fingerprint == self.running.fingerprint => Step::InEffect,
            Ok(loaded) => Step::Apply(Box::new(loaded)),
            Err(e) => Step::Invalid(Refusal {
                result: ReloadResult::InvalidConfig,
                message: e.to_string(),
                always: true,
            }),
        }
    }

    /// First half of a change: refuses settings that need a restart and
    /// validates the render into the staging file. Nothing that runs is
    /// touched.
    pub(super) async fn stage(&mut self, plane: &impl DataPlane, loaded: Loaded) -> Result<Staged, Refusal> {
        if let Some(message) =
            crate::config::restart_only::refusal(&self.applied.loaded.config, &loaded.config)
        {
            self.refused = Some(loaded.rendered.fingerprint.clone());
            return Err(Refusal { result: ReloadResult::InvalidConfig, message, always: false });
        }
        match plane.validate(&loaded.rendered).await {
            Ok(path) => Ok(Staged { loaded, path }),
            Err(e) => {
                self.refused = Some(loaded.rendered.fingerprint.clone());
                let result = if matches!(e, BinaryError::Rejected { .. }) {
                    ReloadResult::Refused
                } else {
                    ReloadResult::Failed
                };
                Err(Refusal { result, message: format!("{}: {e}", self.config_path.display()), always: true })
            }
        }
    }

    /// Second half: saves the server state, puts the file in place and
    /// reloads. On any failure the running config and the file on disk
    /// stay as they were.
    pub(super) async fn commit(&mut self, plane: &impl DataPlane, staged: Staged, why: &str) -> Outcome {
        let Staged { loaded, path } = staged;
        let failed = |message: String| {
            Outcome::NotApplied(Refusal { result: ReloadResult::Failed, message, always: true })
        };
        if !plane.is_running() {
            // HAProxy is down and being restarted: its next start uses the
            // new config.
            return match promote(&self.paths, &path, &loaded) {
                Ok(()) => self.accept(loaded),
                Err(e) => failed(e.to_string()),
            };
        }
        if let Err(e) = plane.save_server_state().await {
            // The new worker would load a stale state file (the failed
            // write leaves the old one): a master DOWN now could start UP.
            // Like any failed step, this refuses the change.
            let _ = std::fs::remove_file(&path);
            self.refused = Some(loaded.rendered.fingerprint.clone());
            return failed(format!("cannot save the server state before the reload: {e}"));
        }
        if let Err(e) = promote(&self.paths, &path, &loaded) {
            return failed(e.to_string());
        }
        plane.set_redactor(&loaded.rendered.redactor);
        match plane.reload().await {
            Ok(proc) => {
                tracing::info!(
                    reason = why,
                    config = loaded.rendered.short_hash(),
                    worker = proc.workers.first().map(|w| w.pid),
                    old_workers = proc.old_workers.len(),
                    "reloaded HAProxy"
                );
                self.accept(loaded)
            }
            Err(e) => self.roll_back(plane, &loaded, e),
        }
    }

    /// A reload failed: puts the last good config back, so a restart of
    /// HAProxy does not pick up the one it refused.
    fn roll_back(&mut self, plane: &impl DataPlane, loaded: &Loaded, e: ReloadError) -> Outcome {
        let restored =
            fsutil::write_atomic(&self.paths.config_file(), self.running.text.expose().as_bytes(), 0o600)
                .and_then(|()| {
                    fsutil::write_atomic(
                        &self.paths.applied_marker(),
                        self.running.fingerprint.as_bytes(),
                        0o600,
                    )
                });
        if let Err(re) = restored {
            tracing::error!(error = %re, "cannot restore the previous haproxy.cfg");
        }
        plane.set_redactor(&self.running.redactor);
        // A busy master refused nothing, and one that did not answer
        // (frozen, overloaded) said nothing about the config: the change is
        // retried (once it answers again, see `on_read`) and stays reported
        // until applied. A refused or unconfirmed one waits for the next
        // change.
        let unanswered = matches!(e, ReloadError::Supervisor(_));
        if !matches!(e, ReloadError::Busy) && !unanswered {
            self.refused = Some(loaded.rendered.fingerprint.clone());
        }
        let result = match e {
            ReloadError::Refused { .. } => ReloadResult::Refused,
            _ => ReloadResult::Failed,
        };
        Outcome::NotApplied(Refusal { result, message: e.to_string(), always: !unanswered })
    }

    /// `loaded` is in effect.
    fn accept(&mut self, loaded: Loaded) -> Outcome {
        let old = &self.applied.loaded.config;
        let discovery_changed = old.discovery != loaded.config.discovery
            || old.listen != loaded.config.listen
            || old.health.tls.server_name() != loaded.config.health.tls.server_name();
        self.running = Running::of(&loaded);
        self.refused = None;
        self.applied = Applied::now(loaded);
        self.remove_unused_files();
        Outcome::Applied { discovery_changed }
    }

    /// Deletes client bundles and CA copies that no config in effect
    /// refers to.
    fn remove_unused_files(&self) {
        let keep: Vec<PathBuf> =
            self.applied.loaded.rendered.aux_files.iter().map(|a| a.path.clone()).collect();
        let Ok(entries) = std::fs::read_dir(&self.paths.runtime_dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if Paths::is_check_file(&name) && !keep.contains(&e.path()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The config in effect with `masters` instead of its own, rendered for
    /// `features`, and how to get there; `None` when the set is the same.
    pub(super) fn with_masters(&self, masters: Vec<Master>, features: Features) -> Option<(Loaded, Plan)> {
        if masters == self.applied.loaded.config.masters {
            return None;
        }
        let mut config = self.applied.loaded.config.clone();
        config.masters = masters;
        let loaded = crate::assemble(config, self.applied.loaded.inputs.clone(), &self.paths, features);
        let plan = diff::plan(self.running.loaded.as_ref(), &self.applied.loaded, &loaded);
        Some((loaded, plan))
    }

    /// Changes servers at run time: validates the new file, brings back
    /// draining masters, adds new ones (enabled after their first check),
    /// drains removed ones, then puts the file in place so a restart of
    /// HAProxy yields the same set. Masters that did not change are not
    /// touched.
    pub(super) async fn change_at_runtime(
        &mut self,
        plane: &impl DataPlane,
        loaded: Loaded,
        change: &Change,
    ) -> Result<(), RuntimeChangeError> {
        let staged = plane.validate(&loaded.rendered).await?;
        let plan = CheckPlan::new(&loaded.config, &loaded.inputs, &self.paths, loaded.rendered.features);
        let (back, fresh): (Vec<_>, Vec<_>) =
            change.added.iter().cloned().partition(|m| self.draining.contains_key(&m.name));
        for m in &back {
            plane.undrain(&m.name).await?;
            self.draining.remove(&m.name);
        }
        let health = &loaded.config.health;
        let wait = health.interval.std() + health.timeout.std() + Duration::from_millis(500);
        plane.add_servers(&plan, &fresh, wait).await?;
        let limit = loaded.config.haproxy.hard_stop_after.std();
        for name in &change.removed {
            plane.drain(name).await?;
            self.draining.insert(name.clone(), Instant::now() + limit);
        }
        promote(&self.paths, &staged, &loaded)?;
        self.running = Running::of(&loaded);
        self.applied = Applied::now(loaded);
        Ok(())
    }

    /// Deletes removed masters once their sessions are gone (or the drain
    /// limit, `haproxy.hard_stop_after`, has passed).
    pub(super) async fn finish_draining(&mut self, plane: &impl DataPlane, stats: &Stats) {
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
                match plane.delete(name).await {
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
}

#[cfg(test)]
mod tests {
    //! The reconciler's decisions against a scripted HAProxy, under paused
    //! time. Integration tests (tests/agent.rs, tests/failover.rs) run the
    //! same paths against the real binary.

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::haproxy::stat::{Proc, ProcInfo, ServerStat};
    use crate::haproxy::supervisor::SupervisorError;

    /// A data plane that answers from a script and records what it was
    /// asked, in order.
    #[derive(Default)]
    struct Fake {
        /// Where `validate` writes the staging file, as the real one does.
        paths: Option<Paths>,
        /// False: HAProxy is down (being restarted).
        down: bool,
        /// Answers to `validate`, in order; `Ok` when empty.
        validations: Mutex<VecDeque<Result<(), BinaryError>>>,
        /// Answers to `reload`, in order; success when empty.
        reloads: Mutex<VecDeque<ReloadError>>,
        /// `save_server_state` fails.
        state_fails: bool,
        /// Every call, e.g. `reload`, `add 10.0.0.3`, `drain master-2`.
        calls: Mutex<Vec<String>>,
    }

    impl Fake {
        fn on(paths: &Paths) -> Fake {
            Fake { paths: Some(paths.clone()), ..Fake::default() }
        }
        fn note(&self, call: String) {
            self.calls.lock().expect("lock").push(call);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("lock").clone()
        }
    }

    impl DataPlane for Fake {
        async fn validate(&self, rendered: &crate::render::Rendered) -> Result<PathBuf, BinaryError> {
            self.note("validate".into());
            self.validations.lock().expect("lock").pop_front().unwrap_or(Ok(()))?;
            let staging = self.paths.as_ref().expect("paths").staging_config();
            std::fs::write(&staging, rendered.text.expose())
                .map_err(|source| BinaryError::Write { path: staging.clone(), source })?;
            Ok(staging)
        }
        fn is_running(&self) -> bool {
            !self.down
        }
        async fn save_server_state(&self) -> Result<(), SupervisorError> {
            self.note("save state".into());
            if self.state_fails {
                let source = std::io::Error::from_raw_os_error(libc::ENOSPC);
                let path = self.paths.as_ref().expect("paths").server_state_file();
                return Err(SupervisorError::File { path, source });
            }
            Ok(())
        }
        async fn reload(&self) -> Result<ProcInfo, ReloadError> {
            self.note("reload".into());
            if let Some(e) = self.reloads.lock().expect("lock").pop_front() {
                return Err(e);
            }
            Ok(ProcInfo {
                master_pid: 1,
                reloads: 1,
                failed_reloads: 0,
                workers: vec![Proc { pid: 2, reloads: 0 }],
                old_workers: vec![],
                version: None,
            })
        }
        fn set_redactor(&self, _: &Redactor) {}
        async fn add_servers(
            &self,
            _: &CheckPlan,
            masters: &[Master],
            _: Duration,
        ) -> Result<(), RuntimeError> {
            for m in masters {
                self.note(format!("add {}", m.name));
            }
            Ok(())
        }
        async fn drain(&self, name: &str) -> Result<(), RuntimeError> {
            self.note(format!("drain {name}"));
            Ok(())
        }
        async fn undrain(&self, name: &str) -> Result<(), RuntimeError> {
            self.note(format!("undrain {name}"));
            Ok(())
        }
        async fn delete(&self, name: &str) -> Result<(), RuntimeError> {
            self.note(format!("delete {name}"));
            Ok(())
        }
    }

    /// A config whose runtime directory is `dir`, with `masters`.
    fn loaded(dir: &std::path::Path, masters: &str, maxconn: u32) -> Loaded {
        let yaml = format!(
            "masters: [{masters}]\nhealth:\n  tls:\n    insecure_skip_verify: true\n\
             haproxy:\n  maxconn: {maxconn}\n  runtime_dir: {d}/run\n  state_dir: {d}/state\n",
            d = dir.display()
        );
        let config = crate::config::Config::parse(&yaml, "test").expect("config parses");
        let inputs = crate::inputs::Inputs::gather(&config).expect("inputs");
        let paths = Paths::from_config(&config);
        crate::assemble(config, inputs, &paths, Features::default())
    }

    /// A reconciler running `first`, with its file in place.
    fn running(first: &Loaded) -> (Reconciler, Paths) {
        let paths = Paths::from_config(&first.config);
        std::fs::create_dir_all(&paths.runtime_dir).expect("runtime dir");
        std::fs::write(paths.config_file(), first.rendered.text.expose()).expect("config");
        std::fs::write(paths.applied_marker(), &first.rendered.fingerprint).expect("marker");
        let r = Reconciler::new(
            paths.clone(),
            "apilb.yaml".into(),
            Applied::now(first.clone()),
            Running::of(first),
        );
        (r, paths)
    }

    async fn apply(r: &mut Reconciler, plane: &Fake, loaded: Loaded) -> Outcome {
        match r.stage(plane, loaded).await {
            Ok(staged) => r.commit(plane, staged, "test").await,
            Err(refusal) => Outcome::NotApplied(refusal),
        }
    }

    fn on_disk(paths: &Paths) -> (String, String) {
        let text = std::fs::read_to_string(paths.config_file()).expect("config");
        let marker = std::fs::read_to_string(paths.applied_marker()).expect("marker");
        (text, marker)
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_applies_once_two_reads_agree_and_haproxy_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = loaded(dir.path(), "10.0.0.1:6443", 1000);
        let (mut r, _) = running(&first);
        let next = loaded(dir.path(), "10.0.0.1:6443", 2000);
        assert!(matches!(r.on_read(Ok(first.clone()), true), Step::InEffect));
        assert!(matches!(r.on_read(Ok(next.clone()), true), Step::Wait), "seen once");
        assert!(matches!(r.on_read(Ok(next.clone()), false), Step::Wait), "HAProxy does not answer");
        assert!(matches!(r.on_read(Ok(next.clone()), true), Step::Apply(_)), "agreed, answering");
        // SIGHUP does not wait for a second read.
        assert!(matches!(r.on_reload_request(Ok(next)), Step::Apply(_)));
        assert!(matches!(r.on_reload_request(Ok(first)), Step::InEffect));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_reload_rolls_back_and_is_not_retried_until_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = loaded(dir.path(), "10.0.0.1:6443", 1000);
        let (mut r, paths) = running(&first);
        let plane = Fake::on(&paths);
        plane.reloads.lock().expect("lock").push_back(ReloadError::Refused { reason: "bad".into() });
        let bad = loaded(dir.path(), "10.0.0.1:6443", 2000);
        let outcome = apply(&mut r, &plane, bad.clone()).await;
        let Outcome::NotApplied(refusal) = outcome else { panic!("applied: {outcome:?}") };
        assert_eq!(refusal.result, ReloadResult::Refused);
        assert!(refusal.always);
        assert_eq!(plane.calls(), ["validate", "save state", "reload"]);
        // The last good file and marker are back; HAProxy's refusal stands.
        assert_eq!(
            on_disk(&paths),
            (first.rendered.text.expose().to_owned(), first.rendered.fingerprint.clone())
        );
        assert_eq!(r.running.fingerprint, first.rendered.fingerprint);
        assert!(matches!(r.on_read(Ok(bad.clone()), true), Step::Wait));
        assert!(matches!(r.on_read(Ok(bad.clone()), true), Step::Wait), "refused: never a candidate");
        // Another change is applied; SIGHUP retries the refused one.
        let good = loaded(dir.path(), "10.0.0.1:6443", 3000);
        assert!(matches!(
            apply(&mut r, &plane, good.clone()).await,
            Outcome::Applied { discovery_changed: false }
        ));
        assert_eq!(
            on_disk(&paths),
            (good.rendered.text.expose().to_owned(), good.rendered.fingerprint.clone())
        );
        assert!(matches!(r.on_reload_request(Ok(bad)), Step::Apply(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_before_the_reload_leave_everything_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = loaded(dir.path(), "10.0.0.1:6443", 1000);
        let (mut r, paths) = running(&first);
        let before = on_disk(&paths);
        // haproxy -c refuses.
        let plane = Fake::on(&paths);
        plane
            .validations
            .lock()
            .expect("lock")
            .push_back(Err(BinaryError::Rejected { messages: "no".into() }));
        let next = loaded(dir.path(), "10.0.0.1:6443", 2000);
        let Outcome::NotApplied(refusal) = apply(&mut r, &plane, next.clone()).await else {
            panic!("applied")
        };
        assert_eq!(refusal.result, ReloadResult::Refused);
        assert!(
            refusal.message.starts_with("apilb.yaml: HAProxy refused the configuration"),
            "{}",
            refusal.message
        );
        assert_eq!(plane.calls(), ["validate"]);
        assert_eq!(on_disk(&paths), before);
        // The server state cannot be saved (full disk): no reload.
        let plane = Fake { state_fails: true, ..Fake::on(&paths) };
        let other = loaded(dir.path(), "10.0.0.1:6443", 3000);
        let Outcome::NotApplied(refusal) = apply(&mut r, &plane, other).await else { panic!("applied") };
        assert_eq!(refusal.result, ReloadResult::Failed);
        assert!(refusal.message.starts_with("cannot save the server state"), "{}", refusal.message);
        assert_eq!(plane.calls(), ["validate", "save state"]);
        assert_eq!(on_disk(&paths), before);
        assert!(!paths.staging_config().exists(), "the staging file is removed");
        // A setting that needs a restart is refused before HAProxy is asked.
        let plane = Fake::on(&paths);
        let mut restart = loaded(dir.path(), "10.0.0.1:6443", 1000);
        restart.config.haproxy.state_dir = dir.path().join("elsewhere");
        let Outcome::NotApplied(refusal) = apply(&mut r, &plane, restart).await else { panic!("applied") };
        assert_eq!(refusal.result, ReloadResult::InvalidConfig);
        assert!(plane.calls().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_or_silent_master_is_asked_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = loaded(dir.path(), "10.0.0.1:6443", 1000);
        let (mut r, paths) = running(&first);
        let plane = Fake::on(&paths);
        plane.reloads.lock().expect("lock").extend([
            ReloadError::Busy,
            ReloadError::Supervisor(SupervisorError::StartTimeout(Duration::from_secs(1))),
        ]);
        let next = loaded(dir.path(), "10.0.0.1:6443", 2000);
        let Outcome::NotApplied(busy) = apply(&mut r, &plane, next.clone()).await else { panic!("applied") };
        assert!(busy.always);
        let Outcome::NotApplied(silent) = apply(&mut r, &plane, next.clone()).await else {
            panic!("applied")
        };
        assert!(!silent.always, "reported once until it answers");
        // Neither is a refusal: the change becomes a candidate again.
        assert!(matches!(r.on_read(Ok(next.clone()), true), Step::Wait));
        assert!(matches!(r.on_read(Ok(next.clone()), true), Step::Apply(_)));
        assert!(matches!(apply(&mut r, &plane, next).await, Outcome::Applied { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn while_haproxy_is_down_a_change_waits_in_place_for_its_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = loaded(dir.path(), "10.0.0.1:6443", 1000);
        let (mut r, paths) = running(&first);
        let plane = Fake { down: true, ..Fake::on(&paths) };
        let next = loaded(dir.path(), "10.0.0.1:6443", 2000);
        assert!(matches!(apply(&mut r, &plane, next.clone()).await, Outcome::Applied { .. }));
        assert_eq!(plane.calls(), ["validate"], "no reload without a master");
        assert_eq!(on_disk(&paths).1, next.rendered.fingerprint);
    }

    #[tokio::test(start_paused = true)]
    async fn servers_change_at_run_time_and_drained_ones_are_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = loaded(dir.path(), "10.0.0.1:6443, 10.0.0.2:6443", 1000);
        let (mut r, paths) = running(&first);
        let plane = Fake::on(&paths);
        let wanted = loaded(dir.path(), "10.0.0.1:6443, 10.0.0.3:6443", 1000).config.masters;
        let (next, plan) = r.with_masters(wanted.clone(), Features::default()).expect("a change");
        let Plan::Runtime(change) = plan else { panic!("expected a runtime change: {plan:?}") };
        r.change_at_runtime(&plane, next.clone(), &change).await.expect("runtime change");
        assert_eq!(plane.calls(), ["validate", "add 10.0.0.3", "drain 10.0.0.2"]);
        assert_eq!(on_disk(&paths).1, next.rendered.fingerprint, "the file follows");
        assert!(r.with_masters(wanted, Features::default()).is_none(), "in effect");
        // The drained master still holds a session: kept until it ends or
        // haproxy.hard_stop_after passes.
        let row = |sessions| ServerStat {
            backend: crate::render::BACKEND.into(),
            name: "10.0.0.2".into(),
            sessions,
            ..ServerStat::default()
        };
        let stats = |sessions| Stats { servers: vec![row(sessions)], ..Stats::default() };
        r.finish_draining(&plane, &stats(1)).await;
        assert!(r.draining.contains_key("10.0.0.2"));
        tokio::time::advance(first.config.haproxy.hard_stop_after.std()).await;
        r.finish_draining(&plane, &stats(1)).await;
        assert!(r.draining.is_empty(), "cut after the limit");
        assert_eq!(plane.calls().last().map(String::as_str), Some("delete 10.0.0.2"));
        // Another HAProxy version under the same set: a reload, not the
        // runtime API.
        let newer = Features { shutdown_sessions_on_mark_down: false };
        let back = loaded(dir.path(), "10.0.0.1:6443", 1000).config.masters;
        let (_, plan) = r.with_masters(back, newer).expect("a change");
        assert!(matches!(plan, Plan::Reload(_)), "{plan:?}");
    }
}
