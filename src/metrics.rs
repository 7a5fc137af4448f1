//! apilb's Prometheus metrics (`apilb_` prefix), plus the standard
//! `process_*` metrics of the agent.
//!
//! Per-master series carry only the `master` label; the address and source
//! are in `apilb_master_info`, so a changed address does not fork every
//! series.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::haproxy::stat::ServerState;

/// Every metric apilb exports.
pub struct Metrics {
    registry: Registry,
    /// 1 while the master is UP (checks pass), else 0.
    pub master_up: IntGaugeVec,
    /// One-hot: 1 for the master's current state.
    pub master_state: IntGaugeVec,
    /// 1 for the current check status code (L7OK, L4CON, …).
    pub master_check_status: IntGaugeVec,
    /// HTTP status of the last check (0 when there was none).
    pub master_check_http_code: IntGaugeVec,
    /// One-hot: the persistent checker's verdict on the master (up, down,
    /// unknown); absent with `health.checker: haproxy`.
    pub checker_verdict: IntGaugeVec,
    /// Checks the persistent checker sent: its request rate on the API
    /// servers.
    pub checker_checks_total: IntCounterVec,
    /// TLS handshakes the persistent checker made: far fewer than checks
    /// while connections are kept (what saves the API server's CPU).
    pub checker_tls_handshakes_total: IntCounterVec,
    /// Latency of the persistent checker's last answered check.
    pub checker_latency_seconds: GaugeVec,
    /// Verdicts that could not be pushed to HAProxy (runtime API errors).
    pub checker_push_errors_total: IntCounter,
    /// Duration of the last check.
    pub master_check_duration_seconds: GaugeVec,
    /// Current connections through the checked server.
    pub master_sessions: IntGaugeVec,
    /// Current connections through the fail-open twin.
    pub master_fallback_sessions: IntGaugeVec,
    /// Connections to the master that failed for good (after retries).
    pub master_connection_errors_total: IntCounterVec,
    /// Connections that failed on the master and were retried on another
    /// one (the client did not notice).
    pub master_redispatches_total: IntCounterVec,
    /// Connection attempts to the master that were retried.
    pub master_retries_total: IntCounterVec,
    /// State transitions, by the state entered.
    pub master_transitions_total: IntCounterVec,
    /// When the master last changed state.
    pub master_last_transition_timestamp_seconds: GaugeVec,
    /// Address and source of each master.
    pub master_info: IntGaugeVec,
    /// Masters in the configuration.
    pub masters_configured: IntGauge,
    /// Masters UP.
    pub masters_healthy: IntGauge,
    /// 1 while the HAProxy master runs and answers.
    pub haproxy_up: IntGauge,
    /// Reload attempts by result.
    pub haproxy_reloads_total: IntCounterVec,
    /// 1 for the reason while the configuration file describes a change
    /// that is not in effect (refused); 0 for every reason once it is.
    /// The reload counter moves once per distinct error, so it cannot say
    /// that a refusal lasts, nor when it ended.
    pub config_not_applied: IntGaugeVec,
    /// Times apilb restarted a dead HAProxy.
    pub haproxy_restarts_total: IntCounter,
    /// HAProxy workers, current and old (draining after a reload).
    pub haproxy_workers: IntGaugeVec,
    /// 1 while HAProxy's master reports that its last reload failed (the
    /// previous worker serves on; 3.1+ calls it recovery mode).
    pub haproxy_last_reload_failed: IntGauge,
    /// 1, labelled with the hash of the haproxy.cfg in effect (`hash`) and
    /// of the apilb.yaml settings it came from (`settings_hash`).
    pub config_info: IntGaugeVec,
    /// When the config in effect was applied.
    pub config_last_apply_timestamp_seconds: Gauge,
    /// 1, labelled with the check's credential kind and verification.
    pub check_auth_info: IntGaugeVec,
    /// 1 while checks run in bootstrap mode (no credential yet: 401/403
    /// count as alive).
    pub check_bootstrap: IntGauge,
    /// 1, labelled with apilb's and HAProxy's versions.
    pub build_info: IntGaugeVec,
    /// Failed polls of HAProxy's runtime API.
    pub poll_errors_total: IntCounter,
    /// Masters in use, by where they came from.
    pub masters_by_source: IntGaugeVec,
    /// 1 when discovery is configured.
    pub discovery_enabled: IntGauge,
    /// When discovery last listed or watched successfully.
    pub discovery_last_success_timestamp_seconds: Gauge,
    /// Times the discovery watch had to start over.
    pub discovery_watch_restarts_total: IntCounter,
    /// 1 while the API's answer is refused as a whole (special addresses,
    /// over `max_masters`, no usable master): the masters in use stay.
    pub discovery_rejected: IntGauge,
    /// Masters added or removed, by how: at run time (no reload) or by a
    /// reload.
    pub master_changes_total: IntCounterVec,
    /// HAProxy's per-server counters as last read, to turn them (they
    /// restart at 0 in each new worker) into monotonic ones.
    last_raw: Mutex<RawCounts>,
}

/// The reasons a configuration file can be left unapplied, as
/// `apilb_config_not_applied{reason}` and
/// `apilb_haproxy_reloads_total{result}` name them.
pub const NOT_APPLIED_REASONS: [&str; 3] = ["invalid_config", "refused", "failed"];

/// The raw per-server counts of the last poll, and whose they were.
#[derive(Debug, Default)]
struct RawCounts {
    /// The worker that counted them: counts of another worker (after a
    /// reload or a restart) start from zero and are added whole.
    worker: Option<u32>,
    /// By (master, HAProxy server, counter): the checked server and its
    /// fail-open twin are counted separately and added to one master.
    values: HashMap<(String, String, &'static str), u64>,
}

/// HAProxy's per-server counters of one poll.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerCounters {
    /// `econ`: connections that failed for good.
    pub errors: u64,
    /// `wretr`: retried connection attempts.
    pub retries: u64,
    /// `wredis`: connections moved to another server.
    pub redispatches: u64,
}

/// Registers a metric whose definition is static: an invalid definition or
/// a duplicate name is a programming error that every test run would hit.
fn register<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, m: prometheus::Result<M>) -> M {
    let m = m.expect("valid metric definition");
    r.register(Box::new(m.clone())).expect("unique metric name");
    m
}

/// Creates metrics of each kind and registers them on one registry.
struct Defs {
    /// Where they are registered.
    registry: Registry,
}

impl Defs {
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        register(&self.registry, IntGauge::new(name, help))
    }
    fn float(&self, name: &str, help: &str) -> Gauge {
        register(&self.registry, Gauge::new(name, help))
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        register(&self.registry, IntCounter::new(name, help))
    }
    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        register(&self.registry, IntGaugeVec::new(Opts::new(name, help), labels))
    }
    fn float_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        register(&self.registry, GaugeVec::new(Opts::new(name, help), labels))
    }
    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        register(&self.registry, IntCounterVec::new(Opts::new(name, help), labels))
    }
}

impl Metrics {
    /// Creates and registers every metric, and the process metrics.
    pub fn new() -> Metrics {
        let m = Metrics::table(Defs { registry: Registry::new() });
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Every apilb metric: its name, help and labels, one entry per field.
    /// A declarative table (tests/code_shape.rs allows its length).
    fn table(d: Defs) -> Metrics {
        Metrics {
            master_up: d.gauge_vec(
                "apilb_master_up",
                "1 while the master passes its checks and is in rotation.",
                &["master"],
            ),
            master_state: d.gauge_vec(
                "apilb_master_state",
                "1 for the master's current state (UP, DOWN, MAINT, DRAIN).",
                &["master", "state"],
            ),
            master_check_status: d.gauge_vec(
                "apilb_master_check_status",
                "1 for HAProxy's current check status of the master (L7OK, L4CON, L6TOUT, L7STS, ...).",
                &["master", "status"],
            ),
            master_check_http_code: d.gauge_vec(
                "apilb_master_check_http_code",
                "HTTP status of the master's last check; 0 when the check got no HTTP answer.",
                &["master"],
            ),
            checker_verdict: d.gauge_vec(
                "apilb_checker_verdict",
                "1 for the persistent checker's verdict on the master (up, down, unknown).",
                &["master", "verdict"],
            ),
            checker_checks_total: d.counter_vec(
                "apilb_checker_checks_total",
                "Checks the persistent checker sent to the master.",
                &["master"],
            ),
            checker_tls_handshakes_total: d.counter_vec(
                "apilb_checker_tls_handshakes_total",
                "TLS handshakes the persistent checker made with the master (one per kept connection).",
                &["master"],
            ),
            checker_latency_seconds: d.float_vec(
                "apilb_checker_latency_seconds",
                "Latency of the persistent checker's last answered check of the master.",
                &["master"],
            ),
            checker_push_errors_total: d.counter(
                "apilb_checker_push_errors_total",
                "Verdicts of the persistent checker that HAProxy's runtime API did not take.",
            ),
            master_check_duration_seconds: d.float_vec(
                "apilb_master_check_duration_seconds",
                "Duration of the master's last check.",
                &["master"],
            ),
            master_sessions: d.gauge_vec(
                "apilb_master_sessions",
                "Current connections through the master's checked server.",
                &["master"],
            ),
            master_fallback_sessions: d.gauge_vec(
                "apilb_master_fallback_sessions",
                "Current connections through the master's fail-open twin (used only when every check fails).",
                &["master"],
            ),
            master_connection_errors_total: d.counter_vec(
                "apilb_master_connection_errors_total",
                "Connections to the master that failed for good, after HAProxy's retries.",
                &["master"],
            ),
            master_redispatches_total: d.counter_vec(
                "apilb_master_redispatches_total",
                "Connections that failed on the master (refused, timed out) and were retried on \
                 another master without the client noticing.",
                &["master"],
            ),
            master_retries_total: d.counter_vec(
                "apilb_master_retries_total",
                "Connection attempts to the master that were retried.",
                &["master"],
            ),
            master_transitions_total: d.counter_vec(
                "apilb_master_transitions_total",
                "State transitions of the master, by the state entered.",
                &["master", "to"],
            ),
            master_last_transition_timestamp_seconds: d.float_vec(
                "apilb_master_last_transition_timestamp_seconds",
                "When the master last changed state (Unix time).",
                &["master"],
            ),
            master_info: d.gauge_vec(
                "apilb_master_info",
                "1 per configured master, with its address and where it came from.",
                &["master", "address", "source"],
            ),
            masters_configured: d.gauge("apilb_masters_configured", "Masters in the configuration."),
            masters_healthy: d.gauge("apilb_masters_healthy", "Masters passing their checks."),
            haproxy_up: d.gauge(
                "apilb_haproxy_up",
                "1 while the HAProxy master runs and answers on its socket.",
            ),
            haproxy_reloads_total: d.counter_vec(
                "apilb_haproxy_reloads_total",
                "Configuration reloads by result: success, invalid_config (refused before HAProxy saw it), refused (HAProxy refused it), failed.",
                &["result"],
            ),
            config_not_applied: d.gauge_vec(
                "apilb_config_not_applied",
                "1 for the reason while the configuration file (apilb.yaml or a file it names) \
                 describes a change that is not in effect: invalid_config (the file is invalid, or \
                 changes a key that only a restart applies), refused (HAProxy refused the config), \
                 failed (a step of the reload failed). 0 for every reason while the file is in effect.",
                &["reason"],
            ),
            haproxy_restarts_total: d.counter(
                    "apilb_haproxy_restarts_total",
                    "Times apilb restarted HAProxy after it died.",
                ),
            haproxy_workers: d.gauge_vec(
                "apilb_haproxy_workers",
                "HAProxy worker processes: current, and old ones still finishing connections after a reload.",
                &["kind"],
            ),
            haproxy_last_reload_failed: d.gauge(
                "apilb_haproxy_last_reload_failed",
                "1 while HAProxy's master reports that its last reload failed, so the worker from \
                 before it serves on (HAProxy 3.1+ calls this recovery mode).",
            ),
            config_info: d.gauge_vec(
                "apilb_config_info",
                "1, labelled with the SHA-256 of the haproxy.cfg in effect (hash; differs per \
                 node when each node's own certificate is in it) and of the apilb.yaml settings \
                 it came from (settings_hash: equal on nodes that share a config).",
                &["hash", "settings_hash"],
            ),
            config_last_apply_timestamp_seconds: d.float(
                    "apilb_config_last_apply_timestamp_seconds",
                    "When the configuration in effect was applied (Unix time).",
                ),
            check_auth_info: d.gauge_vec(
                "apilb_check_auth_info",
                "1, labelled with the credential the check presents (none, bearer, client_cert, bootstrap) and whether certificates are verified.",
                &["mode", "verified"],
            ),
            check_bootstrap: d.gauge(
                "apilb_check_bootstrap",
                "1 while no credential exists yet, so checks accept 401/403 as 'alive, readiness unknown'.",
            ),
            build_info: d.gauge_vec(
                "apilb_build_info",
                "1, labelled with apilb's and HAProxy's versions.",
                &["version", "haproxy_version"],
            ),
            poll_errors_total: d.counter("apilb_haproxy_poll_errors_total", "Failed polls of HAProxy's runtime API."),
            masters_by_source: d.gauge_vec(
                "apilb_masters",
                "Masters in use, by source: static (apilb.yaml), discovered (the default/kubernetes \
                 endpoints) or persisted (saved by the previous run).",
                &["source"],
            ),
            discovery_enabled: d.gauge(
                "apilb_discovery_enabled",
                "1 when discovery of the masters is configured.",
            ),
            discovery_last_success_timestamp_seconds: d.float(
                    "apilb_discovery_last_success_timestamp_seconds",
                    "When discovery last read the API servers' endpoints (Unix time); 0 if never.",
                ),
            discovery_watch_restarts_total: d.counter(
                    "apilb_discovery_watch_restarts_total",
                    "Times the discovery watch started over (expired resourceVersion, errors).",
                ),
            discovery_rejected: d.gauge(
                "apilb_discovery_rejected",
                "1 while discovery refuses the API's answer as a whole (loopback or link-local masters, more \
                 than max_masters, none usable); the masters in use stay.",
            ),
            master_changes_total: d.counter_vec(
                "apilb_master_changes_total",
                "Masters added or removed, by method: runtime (HAProxy's runtime API, no reload) or \
                 reload.",
                &["method"],
            ),
            last_raw: Mutex::new(RawCounts::default()),
            registry: d.registry,
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Sets the one-hot state series of a master.
    pub fn set_state(&self, master: &str, state: Option<ServerState>) {
        for s in ServerState::ALL {
            self.master_state.with_label_values(&[master, s.as_str()]).set(i64::from(Some(s) == state));
        }
        self.master_up.with_label_values(&[master]).set(i64::from(state == Some(ServerState::Up)));
    }

    /// Sets the current check status of a master, dropping the previous one.
    pub fn set_check_status(&self, master: &str, previous: Option<&str>, current: &str) {
        if let Some(p) = previous.filter(|p| *p != current) {
            let _ = self.master_check_status.remove_label_values(&[master, p]);
        }
        if !current.is_empty() {
            self.master_check_status.with_label_values(&[master, current]).set(1);
        }
    }

    /// Creates a master's counters at 0, so `increase()` and alerts work
    /// from its first scrape.
    pub fn init_master(&self, master: &str) {
        for s in ServerState::ALL {
            self.master_transitions_total.with_label_values(&[master, s.as_str()]);
        }
        for c in [
            &self.master_connection_errors_total,
            &self.master_redispatches_total,
            &self.master_retries_total,
        ] {
            c.with_label_values(&[master]);
        }
    }

    /// Says which configuration change is not applied, and why (one of
    /// [`NOT_APPLIED_REASONS`]); `None` once the file is in effect.
    pub fn set_not_applied(&self, reason: Option<&str>) {
        for r in NOT_APPLIED_REASONS {
            self.config_not_applied.with_label_values(&[r]).set(i64::from(Some(r) == reason));
        }
    }

    /// Adds the counts HAProxy's `server` (a master's checked server or
    /// its fail-open twin) gained since the last poll to the master's
    /// monotonic counters. `worker` is the pid of the worker that counted
    /// them: HAProxy counts per worker, so the counts of a new one (after a
    /// reload or a restart) are added whole. Without a pid, a raw value
    /// smaller than the last one is taken for a fresh count too.
    pub fn observe_counters(&self, worker: Option<u32>, master: &str, server: &str, raw: ServerCounters) {
        let mut last = self.last_raw.lock().unwrap_or_else(|e| e.into_inner());
        if worker.is_some() && worker != last.worker {
            last.values.clear();
            last.worker = worker;
        }
        for (name, value, counter) in [
            ("econ", raw.errors, &self.master_connection_errors_total),
            ("wretr", raw.retries, &self.master_retries_total),
            ("wredis", raw.redispatches, &self.master_redispatches_total),
        ] {
            let prev = last.values.insert((master.to_owned(), server.to_owned(), name), value).unwrap_or(0);
            counter.with_label_values(&[master]).inc_by(counted_since(value, prev));
        }
    }

    /// Removes every series of a master that left the configuration;
    /// `check_status` is the last check status exported for it.
    pub fn forget_master(&self, master: &str, check_status: Option<&str>) {
        if let Some(s) = check_status {
            let _ = self.master_check_status.remove_label_values(&[master, s]);
        }
        for s in ServerState::ALL {
            let _ = self.master_transitions_total.remove_label_values(&[master, s.as_str()]);
        }
        for c in [
            &self.master_connection_errors_total,
            &self.master_redispatches_total,
            &self.master_retries_total,
        ] {
            let _ = c.remove_label_values(&[master]);
        }
        for vec in [
            &self.master_up,
            &self.master_check_http_code,
            &self.master_sessions,
            &self.master_fallback_sessions,
        ] {
            let _ = vec.remove_label_values(&[master]);
        }
        for s in ServerState::ALL {
            let _ = self.master_state.remove_label_values(&[master, s.as_str()]);
        }
        let _ = self.master_check_duration_seconds.remove_label_values(&[master]);
        self.forget_checker(master);
        let _ = self.master_last_transition_timestamp_seconds.remove_label_values(&[master]);
        self.last_raw.lock().unwrap_or_else(|e| e.into_inner()).values.retain(|(m, _, _), _| m != master);
    }
}

impl Metrics {
    /// Removes the persistent checker's series of a master (it left the
    /// set, or the checker was turned off).
    pub fn forget_checker(&self, master: &str) {
        for v in ["up", "down", "unknown"] {
            let _ = self.checker_verdict.remove_label_values(&[master, v]);
        }
        let _ = self.checker_checks_total.remove_label_values(&[master]);
        let _ = self.checker_tls_handshakes_total.remove_label_values(&[master]);
        let _ = self.checker_latency_seconds.remove_label_values(&[master]);
    }
}

/// What a source's running count `now` adds since it read `before`: a count
/// smaller than before comes from a source that started over (a new
/// HAProxy worker, a restarted checker), so all of it is new.
pub fn counted_since(now: u64, before: u64) -> u64 {
    if now >= before { now - before } else { now }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(m: &Metrics, name: &str) -> String {
        m.encode()
            .lines()
            .filter(|l| l.starts_with(name))
            .map(|l| l.rsplit_once(' ').map_or("", |(_, v)| v).to_owned())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn counts(errors: u64, retries: u64, redispatches: u64) -> ServerCounters {
        ServerCounters { errors, retries, redispatches }
    }

    /// Every master down: HAProxy counts on the fail-open twins, and the
    /// master's counters include them.
    #[test]
    fn counts_the_fail_open_twin_under_its_master() {
        let m = Metrics::new();
        m.init_master("m1");
        m.observe_counters(Some(10), "m1", "m1", counts(2, 1, 1));
        m.observe_counters(Some(10), "m1", "m1:fallback", counts(0, 0, 0));
        m.observe_counters(Some(10), "m1", "m1", counts(2, 1, 1));
        m.observe_counters(Some(10), "m1", "m1:fallback", counts(5, 3, 4));
        assert_eq!(value(&m, "apilb_master_connection_errors_total{"), "7");
        assert_eq!(value(&m, "apilb_master_retries_total{"), "4");
        assert_eq!(value(&m, "apilb_master_redispatches_total{"), "5");
    }

    /// A reload: the new worker counts from zero. Its counts are added
    /// whole even when they already exceed the old worker's last ones.
    #[test]
    fn a_new_worker_counts_from_zero() {
        let m = Metrics::new();
        m.observe_counters(Some(10), "m1", "m1", counts(3, 0, 0));
        m.observe_counters(Some(11), "m1", "m1", counts(5, 0, 0));
        assert_eq!(value(&m, "apilb_master_connection_errors_total{"), "8");
        m.observe_counters(Some(11), "m1", "m1", counts(6, 0, 0));
        assert_eq!(value(&m, "apilb_master_connection_errors_total{"), "9");
        // Without a pid: a smaller value is a fresh count.
        m.observe_counters(None, "m1", "m1", counts(2, 0, 0));
        assert_eq!(value(&m, "apilb_master_connection_errors_total{"), "11");
        // A master removed and added again starts from zero.
        m.forget_master("m1", None);
        m.observe_counters(Some(11), "m1", "m1", counts(1, 0, 0));
        assert_eq!(value(&m, "apilb_master_connection_errors_total{"), "1");
    }

    #[test]
    fn one_reason_at_a_time_for_a_change_not_applied() {
        let m = Metrics::new();
        m.set_not_applied(None);
        assert_eq!(value(&m, "apilb_config_not_applied{"), "0,0,0");
        m.set_not_applied(Some("refused"));
        let text = m.encode();
        assert!(text.contains("apilb_config_not_applied{reason=\"refused\"} 1"), "{text}");
        assert!(text.contains("apilb_config_not_applied{reason=\"invalid_config\"} 0"), "{text}");
        m.set_not_applied(None);
        assert_eq!(value(&m, "apilb_config_not_applied{"), "0,0,0");
    }
}
