//! Watching HAProxy: the process tree and server states, turned into
//! status, metrics and logged transitions.

use super::{Agent, unix_now};
use crate::haproxy::cli::POLL_TIMEOUT;
use crate::haproxy::stat::{ServerStat, Stats};
use crate::metrics::ServerCounters;
use crate::render::FALLBACK_SUFFIX;
use crate::status::MasterStatus;

impl Agent {
    /// Reads HAProxy's process tree and server states, updates metrics and
    /// status, and logs state transitions.
    pub(super) async fn poll(&mut self) {
        let Some(h) = &self.haproxy else {
            self.publish();
            return;
        };
        // Short limits: a frozen HAProxy shows as down at this poll, and
        // the agent's loop is not held up by it.
        let (proc, stats) = tokio::join!(h.show_proc_within(POLL_TIMEOUT), h.show_stat_within(POLL_TIMEOUT));
        match &proc {
            Ok(p) => {
                self.workers_seen = p.workers.iter().chain(&p.old_workers).map(|w| w.pid).collect();
                self.status.haproxy.master_pid = Some(p.master_pid);
                // In 3.1+'s recovery mode the serving worker is listed
                // among the old ones: report it as the one that serves.
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
            Err(e) => {
                self.metrics.poll_errors_total.inc();
                tracing::warn!(error = %e, "cannot read HAProxy's process list");
            }
        }
        self.status.haproxy.running = proc.is_ok();
        self.status.haproxy.adopted = h.adopted();
        let version = h.version().full;
        if version != self.status.haproxy.version {
            self.metrics.build_info.reset();
            self.metrics.build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &version]).set(1);
            self.status.haproxy.version = version;
        }
        self.metrics.haproxy_up.set(i64::from(proc.is_ok()));
        match stats {
            Ok(stats) => {
                self.observe(&stats);
                self.finish_draining(&stats).await;
                // A mark-down whose event was missed (the agent was
                // restarting, or the event queue full).
                for name in self.down_with_sessions(&stats) {
                    self.close_sessions_of(&name).await;
                }
            }
            Err(e) => {
                self.metrics.poll_errors_total.inc();
                tracing::warn!(error = %e, "cannot read HAProxy's server states");
            }
        }
        self.publish();
    }

    /// Reads the serving worker's servers once more just before a reload
    /// replaces it: the new worker counts from zero, so what the old one
    /// counted since the last poll would otherwise be lost.
    pub(super) async fn capture_counters(&mut self) {
        let Some(h) = &self.haproxy else { return };
        if let Ok(stats) = h.show_stat_within(POLL_TIMEOUT).await {
            self.observe(&stats);
        }
    }

    /// Configured masters that are DOWN and still hold sessions.
    fn down_with_sessions(&self, stats: &Stats) -> Vec<String> {
        let config = &self.applied.loaded.config;
        stats
            .servers
            .iter()
            .filter(|s| s.backend == crate::render::BACKEND && s.sessions > 0)
            .filter(|s| s.state() == crate::haproxy::stat::ServerState::Down)
            .filter(|s| config.masters.iter().any(|m| m.name == s.name))
            .map(|s| s.name.clone())
            .collect()
    }

    pub(super) fn observe(&mut self, stats: &Stats) {
        let config = &self.applied.loaded.config;
        self.status.haproxy.frontend_open =
            stats.frontends.iter().any(|f| f.name == crate::render::FRONTEND && f.status == "OPEN");
        let now = unix_now();
        let mut masters = Vec::with_capacity(config.masters.len());
        for m in &config.masters {
            let row = stats.servers.iter().find(|s| s.backend == crate::render::BACKEND && s.name == m.name);
            let fallback_name = format!("{}{FALLBACK_SUFFIX}", m.name);
            let twin =
                stats.servers.iter().find(|s| s.backend == crate::render::BACKEND && s.name == fallback_name);
            let mut ms = MasterStatus {
                name: m.name.clone(),
                address: m.address.to_string(),
                source: self.sources.source_of(m).as_str().into(),
                state: "unknown".into(),
                fallback_sessions: twin.map(|t| t.sessions).unwrap_or(0),
                ..MasterStatus::default()
            };
            self.metrics
                .master_fallback_sessions
                .with_label_values(&[&m.name])
                .set(ms.fallback_sessions as i64);
            // HAProxy counts a connection that fails in fail-open on the
            // twin: it is the master's all the same.
            for server in row.into_iter().chain(twin) {
                self.metrics.observe_counters(stats.worker_pid, &m.name, &server.name, counters(server));
            }
            if let Some(row) = row {
                let state = row.state();
                let name = m.name.as_str();
                // While a check runs HAProxy reports no code: the last
                // poll's stands.
                let check_code = match row.check_code {
                    None if row.check_in_progress => {
                        self.status.masters.iter().find(|p| p.name == m.name).and_then(|p| p.check_code)
                    }
                    code => code,
                };
                ms.state = state.as_str().into();
                ms.check_status = row.check_status.clone();
                ms.check_desc = row.check_desc.clone();
                ms.check_code = check_code;
                ms.check_info = row.last_check.clone();
                ms.check_duration_ms = row.check_duration_ms;
                ms.since_change_s = row.last_change_s;
                ms.sessions = row.sessions;
                ms.connect_errors = row.connect_errors + twin.map_or(0, |t| t.connect_errors);

                self.metrics.set_state(name, Some(state));
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
                        .set(now - s as f64);
                }
                match self.states.insert(name.to_owned(), state) {
                    Some(prev) if prev != state => {
                        self.metrics
                            .master_transitions_total
                            .with_label_values(&[name, state.as_str()])
                            .inc();
                        let code = row.check_code.map(|c| format!(", HTTP {c}")).unwrap_or_default();
                        let info = if row.last_check.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", row.last_check)
                        };
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
                    _ => {}
                }
            }
            masters.push(ms);
        }
        // Removed masters still finishing their connections.
        for name in self.draining.keys() {
            if let Some(row) =
                stats.servers.iter().find(|s| s.backend == crate::render::BACKEND && &s.name == name)
            {
                masters.push(MasterStatus {
                    name: name.clone(),
                    address: row.addr.clone(),
                    source: "removed (draining)".into(),
                    state: row.state().as_str().into(),
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
}

/// HAProxy's counters of one server row.
fn counters(row: &ServerStat) -> ServerCounters {
    ServerCounters { errors: row.connect_errors, retries: row.retries, redispatches: row.redispatches }
}
