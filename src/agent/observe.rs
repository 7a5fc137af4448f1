//! The observer: owns what operators see. It turns HAProxy's process
//! tree and server states, the reconciler's outcomes and discovery's
//! reports into status, metrics and logged transitions, and publishes the
//! status to `/status`, `/readyz` and systemd.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::sync::watch;

use super::reconcile::{Applied, Refusal};
use super::unix_now;
use crate::config::{Config, Master};
use crate::haproxy::stat::{ProcInfo, ServerStat, ServerState, Stats};
use crate::haproxy::supervisor::SupervisorError;
use crate::inputs::Verify;
use crate::masters::{Source, Sources};
use crate::metrics::{Metrics, ServerCounters};
use crate::render::{BACKEND, FALLBACK_SUFFIX, FRONTEND};
use crate::status::{CheckStatus, MasterState, MasterStatus, Membership, ReloadRecord, ReloadResult, Status};
use crate::systemd;

/// Status and metrics, and the memory needed to report changes once.
pub(super) struct Observer {
    /// The Prometheus registry, shared with the HTTP endpoint.
    pub(super) metrics: Arc<Metrics>,
    /// The picture being built; published by [`Observer::publish`].
    pub(super) status: Status,
    /// Where the published status goes (`/status`, `/readyz`, tests).
    status_tx: watch::Sender<Status>,
    /// Each master's state at the last poll, to log and count transitions.
    states: HashMap<String, ServerState>,
    /// Each master's check status at the last poll, to move its one-hot
    /// metric.
    check_statuses: HashMap<String, String>,
    /// The last refusal reported, so one that repeats every second is
    /// logged once.
    last_error: Option<String>,
    /// Each checker's counts (checks, handshakes) at the last poll, to add
    /// only what is new to the monotonic counters.
    checker_counts: HashMap<String, (u64, u64)>,
}

impl Observer {
    /// Reports through `metrics` and `status_tx`; every labelled series the
    /// alerts use exists from the start.
    pub(super) fn new(metrics: Arc<Metrics>, status_tx: watch::Sender<Status>) -> Self {
        for result in ReloadResult::ALL {
            metrics.haproxy_reloads_total.with_label_values(&[result.as_str()]);
        }
        metrics.set_not_applied(None);
        for method in ["runtime", "reload"] {
            metrics.master_changes_total.with_label_values(&[method]);
        }
        Observer {
            metrics,
            status: Status::default(),
            status_tx,
            states: HashMap::new(),
            check_statuses: HashMap::new(),
            last_error: None,
            checker_counts: HashMap::new(),
        }
    }

    /// True while a refusal is reported.
    pub(super) fn has_error(&self) -> bool {
        self.last_error.is_some()
    }

    /// A change took effect.
    pub(super) fn applied(&mut self) {
        self.metrics.haproxy_reloads_total.with_label_values(&[ReloadResult::Success.as_str()]).inc();
        self.status.config.last_reload =
            Some(ReloadRecord { at: unix_now(), result: ReloadResult::Success, message: None });
        self.clear_error();
    }

    /// The file is applied or back to the config in effect: nothing is
    /// pending any more.
    pub(super) fn clear_error(&mut self) {
        self.last_error = None;
        self.status.config.pending_error = None;
        self.metrics.set_not_applied(None);
    }

    /// Reports a refused change: logged and counted once per distinct
    /// error; `apilb_config_not_applied` and the status say it lasts until
    /// the file is applied or back to the config in effect. `running` is
    /// the hash of the config HAProxy keeps.
    pub(super) fn not_applied(&mut self, refusal: Refusal, running: &str) {
        let Refusal { result, message, always } = refusal;
        if !always && self.last_error.as_deref() == Some(&message) {
            return;
        }
        tracing::error!(
            result = result.as_str(),
            running = &running[..running.len().min(12)],
            "configuration change not applied; HAProxy keeps the config in effect: {message}"
        );
        self.metrics.haproxy_reloads_total.with_label_values(&[result.as_str()]).inc();
        self.metrics.set_not_applied(Some(result.as_str()));
        self.status.config.last_reload =
            Some(ReloadRecord { at: unix_now(), result, message: Some(message.clone()) });
        self.status.config.pending_error = Some(message.clone());
        self.last_error = Some(message);
    }

    /// Records the config in effect in metrics and status.
    pub(super) fn config_in_effect(&mut self, applied: &Applied, sources: &Sources) {
        let config = &applied.loaded.config;
        let at = applied.at.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let settings = config.settings_hash();
        self.status.listen = config.listen.to_string();
        // One series: the config in effect, not every config ever applied.
        self.metrics.config_info.reset();
        self.metrics.config_info.with_label_values(&[&applied.loaded.rendered.hash, &settings]).set(1);
        self.status.config.settings_hash = settings;
        self.metrics.config_last_apply_timestamp_seconds.set(at);
        self.status.config.hash = applied.loaded.rendered.hash.clone();
        self.status.config.applied_at = Some(at);
        self.check_in_effect(&applied.loaded.inputs.check);
        self.masters_in_effect(&config.masters, sources);
    }

    /// The check's credential and verification, and the bootstrap
    /// transitions.
    fn check_in_effect(&mut self, check: &crate::inputs::CheckAuth) {
        self.metrics.check_auth_info.reset();
        let verified = matches!(check.verify, Verify::Ca { .. });
        self.metrics
            .check_auth_info
            .with_label_values(&[check.mode_in_use(), if verified { "true" } else { "false" }])
            .set(1);
        self.metrics.check_bootstrap.set(i64::from(check.bootstrap));
        if check.bootstrap {
            tracing::warn!(
                "bootstrap: no usable credential for the /readyz check yet, so 401/403 count as \
                 \"alive, readiness unknown\"; apilb switches to authenticated checks when one appears"
            );
        } else if self.status.check.auth == "bootstrap" {
            tracing::info!(
                credential = check.mode_in_use(),
                source = %check.source,
                verified,
                "bootstrap over: the /readyz check now presents the node's credential; 401/403 count as failures"
            );
        }
        self.status.check =
            CheckStatus { auth: check.mode_in_use().into(), source: check.source.clone(), verified };
    }

    /// The set in effect: per-master series, removed masters forgotten.
    fn masters_in_effect(&mut self, masters: &[Master], sources: &Sources) {
        self.metrics.masters_configured.set(masters.len() as i64);
        let known: Vec<&str> = masters.iter().map(|m| m.name.as_str()).collect();
        let gone: Vec<String> =
            self.states.keys().filter(|n| !known.contains(&n.as_str())).cloned().collect();
        for name in gone {
            let last_check = self.check_statuses.remove(&name);
            self.metrics.forget_master(&name, last_check.as_deref());
            self.states.remove(&name);
        }
        self.metrics.master_info.reset();
        let mut by_source: HashMap<Source, i64> = HashMap::new();
        for m in masters {
            let source = sources.source_of(m);
            *by_source.entry(source).or_default() += 1;
            self.metrics
                .master_info
                .with_label_values(&[&m.name, &m.address.to_string(), source.as_str()])
                .set(1);
            self.metrics.init_master(&m.name);
        }
        for s in Source::ALL {
            self.metrics
                .masters_by_source
                .with_label_values(&[s.as_str()])
                .set(by_source.get(&s).copied().unwrap_or(0));
        }
    }

    /// HAProxy's master died.
    pub(super) fn haproxy_died(&mut self) {
        self.metrics.haproxy_up.set(0);
        self.status.haproxy.running = false;
        self.status.haproxy.frontend_open = false;
    }

    /// A new HAProxy master replaced a dead one.
    pub(super) fn haproxy_restarted(&mut self) {
        self.metrics.haproxy_restarts_total.inc();
        self.status.haproxy.restarts += 1;
    }

    /// HAProxy's process list (or why it could not be read), from the
    /// master `adopted` or not, running `version`.
    pub(super) fn process_tree(
        &mut self,
        proc: &Result<ProcInfo, SupervisorError>,
        adopted: bool,
        version: String,
    ) {
        match proc {
            Ok(p) => self.workers(p),
            Err(e) => {
                self.metrics.poll_errors_total.inc();
                tracing::warn!(error = %e, "cannot read HAProxy's process list");
            }
        }
        self.status.haproxy.running = proc.is_ok();
        self.status.haproxy.adopted = adopted;
        if version != self.status.haproxy.version {
            self.metrics.build_info.reset();
            self.metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &version]).set(1);
            self.status.haproxy.version = version;
        }
        self.metrics.haproxy_up.set(i64::from(proc.is_ok()));
    }

    fn workers(&mut self, p: &ProcInfo) {
        self.status.haproxy.master_pid = Some(p.master_pid);
        // In 3.1+'s recovery mode the serving worker is listed among the
        // old ones: report it as the one that serves.
        let (serving, draining) = (p.serving(), p.draining());
        self.status.haproxy.workers = serving.iter().map(|w| w.pid).collect();
        self.status.haproxy.old_workers = draining.iter().map(|w| w.pid).collect();
        self.metrics.haproxy_workers.with_label_values(&["current"]).set(serving.len() as i64);
        self.metrics.haproxy_workers.with_label_values(&["old"]).set(draining.len() as i64);
        let failed = p.last_reload_failed();
        if failed && !self.status.haproxy.last_reload_failed {
            tracing::warn!(
                worker = ?self.status.haproxy.workers,
                recovery = p.recovery(),
                "HAProxy reports that its last reload failed; the worker from before it serves on"
            );
        }
        self.status.haproxy.last_reload_failed = failed;
        self.metrics.haproxy_last_reload_failed.set(i64::from(failed));
    }

    /// `show stat` could not be read.
    pub(super) fn stats_unreadable(&mut self, e: &SupervisorError) {
        self.metrics.poll_errors_total.inc();
        tracing::warn!(error = %e, "cannot read HAProxy's server states");
    }

    /// Server states and counters: status, metrics and transitions for
    /// every master of `config`, and the removed ones still `draining`.
    pub(super) fn observe<'a>(
        &mut self,
        stats: &Stats,
        config: &Config,
        sources: &Sources,
        draining: impl Iterator<Item = &'a String>,
    ) {
        self.status.haproxy.frontend_open =
            stats.frontends.iter().any(|f| f.name == FRONTEND && f.status == "OPEN");
        let mut masters = Vec::with_capacity(config.masters.len());
        for m in &config.masters {
            masters.push(self.master(stats, m, sources.source_of(m)));
        }
        // Removed masters still finishing their connections.
        for name in draining {
            if let Some(row) = stats.servers.iter().find(|s| s.backend == BACKEND && &s.name == name) {
                masters.push(MasterStatus {
                    name: name.clone(),
                    address: row.addr.clone(),
                    source: Membership::Draining,
                    state: MasterState::Known(row.state()),
                    check_status: row.check_status.clone(),
                    check_desc: row.check_desc.clone(),
                    check_code: row.check_code,
                    sessions: row.sessions,
                    ..MasterStatus::default()
                });
            }
        }
        self.status.masters = masters;
        let healthy = self.status.healthy();
        self.metrics.masters_healthy.set(healthy as i64);
    }

    /// One master's row, twin and metrics.
    fn master(&mut self, stats: &Stats, m: &Master, source: Source) -> MasterStatus {
        let find = |name: &str| stats.servers.iter().find(|s| s.backend == BACKEND && s.name == name);
        let row = find(&m.name);
        let twin = find(&format!("{}{FALLBACK_SUFFIX}", m.name));
        let mut ms = MasterStatus {
            name: m.name.clone(),
            address: m.address.to_string(),
            source: Membership::Member(source),
            fallback_sessions: twin.map(|t| t.sessions).unwrap_or(0),
            ..MasterStatus::default()
        };
        self.metrics.master_fallback_sessions.with_label_values(&[&m.name]).set(ms.fallback_sessions as i64);
        // HAProxy counts a connection that fails in fail-open on the twin:
        // it is the master's all the same.
        for server in row.into_iter().chain(twin) {
            self.metrics.observe_counters(stats.worker_pid, &m.name, &server.name, counters(server));
        }
        let Some(row) = row else { return ms };
        // While a check runs HAProxy reports no code: the last poll's
        // stands.
        let check_code = match row.check_code {
            None if row.check_in_progress => {
                self.status.masters.iter().find(|p| p.name == m.name).and_then(|p| p.check_code)
            }
            code => code,
        };
        ms.state = MasterState::Known(row.state());
        ms.check_status = row.check_status.clone();
        ms.check_desc = row.check_desc.clone();
        ms.check_code = check_code;
        ms.check_info = row.last_check.clone();
        ms.check_duration_ms = row.check_duration_ms;
        ms.since_change_s = row.last_change_s;
        ms.sessions = row.sessions;
        ms.connect_errors = row.connect_errors + twin.map_or(0, |t| t.connect_errors);
        self.master_metrics(&m.name, row, check_code);
        self.transition(m, row);
        ms
    }

    fn master_metrics(&mut self, name: &str, row: &ServerStat, check_code: Option<u16>) {
        self.metrics.set_state(name, Some(row.state()));
        let prev_check = self.check_statuses.insert(name.to_owned(), row.check_status.clone());
        self.metrics.set_check_status(name, prev_check.as_deref(), &row.check_status);
        self.metrics
            .master_check_http_code
            .with_label_values(&[name])
            .set(i64::from(check_code.unwrap_or(0)));
        self.metrics
            .master_check_duration_seconds
            .with_label_values(&[name])
            .set(row.check_duration_ms.unwrap_or(0) as f64 / 1000.0);
        self.metrics.master_sessions.with_label_values(&[name]).set(row.sessions as i64);
        if let Some(s) = row.last_change_s {
            self.metrics
                .master_last_transition_timestamp_seconds
                .with_label_values(&[name])
                .set(unix_now() - s as f64);
        }
    }

    /// Logs and counts a change of state since the last poll.
    fn transition(&mut self, m: &Master, row: &ServerStat) {
        let (name, state) = (m.name.as_str(), row.state());
        let Some(prev) = self.states.insert(name.to_owned(), state) else { return };
        if prev == state {
            return;
        }
        self.metrics.master_transitions_total.with_label_values(&[name, state.as_str()]).inc();
        let code = row.check_code.map(|c| format!(", HTTP {c}")).unwrap_or_default();
        let info = if row.last_check.is_empty() { String::new() } else { format!(", {}", row.last_check) };
        tracing::info!(
            master = name,
            address = %m.address,
            from = prev.as_str(),
            to = state.as_str(),
            check = %row.check_status,
            "{name} is {} (was {}): {} {}{code}{info}",
            state.as_str(),
            prev.as_str(),
            row.check_status,
            row.check_desc,
        );
    }

    /// The persistent checker's verdicts and counters, as series.
    pub(super) fn checker_reports(&mut self, reports: &[crate::check::Report]) {
        for r in reports {
            let name = r.name.as_str();
            let verdict = match r.verdict {
                crate::check::Verdict::Up { .. } => "up",
                crate::check::Verdict::Down(_) => "down",
                crate::check::Verdict::Unknown => "unknown",
            };
            for v in ["up", "down", "unknown"] {
                self.metrics.checker_verdict.with_label_values(&[name, v]).set(i64::from(v == verdict));
            }
            // A restarted checker counts from zero: its counts are new.
            let (checks, handshakes) =
                self.checker_counts.insert(r.name.clone(), (r.checks, r.handshakes)).unwrap_or((0, 0));
            let delta = crate::metrics::counted_since;
            self.metrics.checker_checks_total.with_label_values(&[name]).inc_by(delta(r.checks, checks));
            self.metrics
                .checker_tls_handshakes_total
                .with_label_values(&[name])
                .inc_by(delta(r.handshakes, handshakes));
            if let Some(Ok((_, latency))) = &r.last {
                self.metrics.checker_latency_seconds.with_label_values(&[name]).set(latency.as_secs_f64());
            }
        }
        self.checker_counts.retain(|name, _| reports.iter().any(|r| &r.name == name));
    }

    /// Sends the status to watchers and systemd when it changed.
    pub(super) fn publish(&mut self) {
        self.status.version = env!("CARGO_PKG_VERSION").into();
        let previous = self.status_tx.borrow().summary();
        let summary = self.status.summary();
        if summary != previous {
            systemd::notify(&format!("STATUS={summary}"));
        }
        self.status_tx.send_replace(self.status.clone());
    }
}

/// Masters of `config` that are DOWN and still hold sessions.
pub(super) fn down_with_sessions(stats: &Stats, config: &Config) -> Vec<String> {
    stats
        .servers
        .iter()
        .filter(|s| s.backend == BACKEND && s.sessions > 0)
        .filter(|s| s.state() == ServerState::Down)
        .filter(|s| config.masters.iter().any(|m| m.name == s.name))
        .map(|s| s.name.clone())
        .collect()
}

/// HAProxy's counters of one server row.
fn counters(row: &ServerStat) -> ServerCounters {
    ServerCounters { errors: row.connect_errors, retries: row.retries, redispatches: row.redispatches }
}
