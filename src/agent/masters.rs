//! The master set: discovery reports, the policy's desired set, and
//! changes through HAProxy's runtime API (or a reload).

use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Agent, Applied, Running, promote, stage_and_validate, unix_now};
use crate::config::Master;
use crate::discovery;
use crate::haproxy::runtime;
use crate::haproxy::stat::Stats;
use crate::layout::Paths;
use crate::masters::Sources;
use crate::render::{CheckPlan, FALLBACK_SUFFIX, Features};
use crate::status::DiscoveryStatus;
use crate::{LoadError, Loaded};

/// The config with the masters of the current policy (see `masters`).
pub(super) fn effective(
    mut config: crate::config::Config,
    inputs: crate::inputs::Inputs,
    sources: &Sources,
    paths: &Paths,
    features: Features,
) -> Loaded {
    config.masters = sources.desired();
    crate::assemble(config, inputs, paths, features)
}

/// True when two renders differ only in `server` lines, so the runtime API
/// can make the change without a reload.
fn only_servers_differ(old: &str, new: &str) -> bool {
    let rest =
        |t: &str| t.lines().filter(|l| !l.trim_start().starts_with("server ")).collect::<Vec<_>>().join("\n");
    rest(old) == rest(new)
}

/// The masters of a running haproxy.cfg, as a config to adopt: only when it
/// differs from `base` in server lines alone and re-rendering them with
/// `base`'s config and inputs reproduces the running file exactly.
pub(super) fn running_set(
    running_text: &str,
    running_fingerprint: &str,
    base: &Loaded,
    paths: &Paths,
) -> Option<Loaded> {
    if !only_servers_differ(running_text, base.rendered.text.expose()) {
        return None;
    }
    let masters: Vec<Master> = running_text
        .lines()
        .filter_map(|l| {
            let mut words = l.trim_start().strip_prefix("server ")?.split_whitespace();
            let (name, address) = (words.next()?, words.next()?);
            if name.ends_with(FALLBACK_SUFFIX) {
                return None;
            }
            Some(Master { name: name.to_owned(), address: address.parse().ok()? })
        })
        .collect();
    if masters.is_empty() {
        return None;
    }
    let mut config = base.config.clone();
    config.masters = masters;
    let current = crate::assemble(config, base.inputs.clone(), paths, base.rendered.features);
    (current.rendered.fingerprint == running_fingerprint).then_some(current)
}

impl Agent {
    /// Loads apilb.yaml and its files and renders them with the masters of
    /// the current policy.
    pub(super) fn load_effective(&mut self) -> Result<Loaded, LoadError> {
        let (yaml, inputs) = crate::load_parts(&self.opts.config_path)?;
        self.sources.seeds.clone_from(&yaml.masters);
        if yaml.discovery.kubernetes.is_none() {
            self.sources.persisted.clear();
            self.sources.discovered = None;
        }
        Ok(effective(yaml, inputs, &self.sources, &self.paths, self.features()))
    }

    /// (Re)starts the discovery watcher for the config in effect.
    pub(super) fn restart_discovery(&mut self) {
        self.stop_discovery();
        let config = &self.applied.loaded.config;
        let Some(settings) = config.discovery.kubernetes.clone() else {
            self.status.discovery = None;
            self.metrics.discovery_enabled.set(0);
            return;
        };
        self.metrics.discovery_enabled.set(1);
        let (tx, rx) = mpsc::channel(16);
        let opts = discovery::Options {
            settings,
            local: crate::status_client::target(config.listen.0),
            server_name: config.health.tls.server_name().to_owned(),
            watch_timeout: Duration::from_secs(290),
        };
        self.discovery = Some(discovery::spawn(opts, tx));
        self.discovery_rx = Some(rx);
        self.status.discovery.get_or_insert_with(DiscoveryStatus::default);
    }

    pub(super) fn stop_discovery(&mut self) {
        if let Some(task) = self.discovery.take() {
            task.abort();
        }
        self.discovery_rx = None;
    }

    /// A report from the discovery watcher.
    pub(super) async fn on_discovery(&mut self, update: discovery::Update) {
        let status = self.status.discovery.get_or_insert_with(DiscoveryStatus::default);
        match update {
            discovery::Update::Found { addresses, refused, api } => {
                let now = unix_now();
                status.api = api.to_owned();
                status.last_success = Some(now);
                status.last_error = None;
                self.metrics.discovery_last_success_timestamp_seconds.set(now);
                if !refused.is_empty() && status.refused != refused {
                    tracing::warn!("discovery refused addresses the API listed: {}", refused.join("; "));
                }
                status.refused = refused;
                status.rejected = None;
                self.metrics.discovery_rejected.set(0);
                self.last_discovery_problem = None;
                if self.sources.discovered.is_none() {
                    tracing::info!(
                        api,
                        count = addresses.len(),
                        "discovery succeeded; the discovered API servers replace the static seeds"
                    );
                }
                self.sources.discovered = Some(addresses);
                self.apply_masters().await;
            }
            discovery::Update::Alive => {
                let now = unix_now();
                status.last_success = Some(now);
                status.last_error = None;
                self.metrics.discovery_last_success_timestamp_seconds.set(now);
            }
            discovery::Update::Restarted(why) => {
                status.watch_restarts += 1;
                status.last_error = Some(why.clone());
                self.metrics.discovery_watch_restarts_total.inc();
                tracing::warn!("discovery watch restarted: {why}");
            }
            discovery::Update::Rejected(why) => {
                tracing::warn!("discovery: {why}");
                status.rejected = Some(why);
                self.metrics.discovery_rejected.set(1);
            }
            discovery::Update::Failing(why) => {
                status.last_error = Some(why.clone());
                if self.last_discovery_problem.as_deref() != Some(&why) {
                    tracing::warn!("discovery: {why}");
                    self.last_discovery_problem = Some(why);
                }
            }
        }
        self.publish();
    }

    /// Brings HAProxy's masters in line with the policy: through the
    /// runtime API when only servers change, else by a validated reload.
    pub(super) async fn apply_masters(&mut self) {
        let desired = self.sources.desired();
        if desired == self.applied.loaded.config.masters {
            // Same servers; sources may have changed (static → discovered).
            self.mark_applied();
            return;
        }
        let mut config = self.applied.loaded.config.clone();
        config.masters = desired;
        let loaded =
            crate::assemble(config, self.applied.loaded.inputs.clone(), &self.paths, self.features());
        let change = runtime::diff(&self.applied.loaded.config.masters, &loaded.config.masters);
        let runtime_ok = self.haproxy.is_some()
            && only_servers_differ(self.running.text.expose(), loaded.rendered.text.expose())
            && change.added.iter().all(|m| !m.address.is_dns());
        if runtime_ok {
            match self.apply_runtime(&loaded, &change).await {
                Ok(()) => {
                    let names = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
                    tracing::info!(
                        added = %names(change.added.iter().map(|m| format!("{} ({})", m.name, m.address)).collect()),
                        removed = %names(change.removed.clone()),
                        config = loaded.rendered.short_hash(),
                        "masters changed through HAProxy's runtime API (no reload); removed ones drain"
                    );
                    self.metrics
                        .master_changes_total
                        .with_label_values(&["runtime"])
                        .inc_by(change.len() as u64);
                    self.running = Running::of(&loaded.rendered);
                    self.applied = Applied { loaded, at: SystemTime::now() };
                    self.mark_applied();
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot change the masters at run time ({e}); falling back to a reload")
                }
            }
        }
        let fingerprint = loaded.rendered.fingerprint.clone();
        self.apply(loaded, "the master set changed").await;
        if self.running.fingerprint == fingerprint {
            self.metrics.master_changes_total.with_label_values(&["reload"]).inc_by(change.len() as u64);
            // A reload dropped the draining servers from the new worker.
            self.draining.clear();
        }
    }

    /// Validates the new file, adds and drains servers through the runtime
    /// API, then puts the file in place so a restart yields the same set.
    pub(super) async fn apply_runtime(
        &mut self,
        loaded: &Loaded,
        change: &runtime::Change,
    ) -> Result<(), String> {
        let staged = stage_and_validate(&self.binary, &self.paths, &loaded.rendered)
            .await
            .map_err(|e| e.to_string())?;
        let h = self.haproxy.as_ref().ok_or("HAProxy is not running")?;
        let plan = CheckPlan::new(&loaded.config, &loaded.inputs, &self.paths, loaded.rendered.features);
        let (back, fresh): (Vec<_>, Vec<_>) =
            change.added.iter().cloned().partition(|m| self.draining.contains_key(&m.name));
        for m in &back {
            runtime::undrain(h, &m.name).await.map_err(|e| e.to_string())?;
            self.draining.remove(&m.name);
        }
        let health = &loaded.config.health;
        let wait = health.interval.std() + health.timeout.std() + Duration::from_millis(500);
        let haproxy = self.haproxy.as_ref().ok_or("HAProxy is not running")?;
        runtime::add(haproxy, &plan, &fresh, wait).await.map_err(|e| e.to_string())?;
        let limit = loaded.config.haproxy.hard_stop_after.std();
        for name in &change.removed {
            runtime::drain(haproxy, name).await.map_err(|e| e.to_string())?;
            self.draining.insert(name.clone(), Instant::now() + limit);
        }
        promote(&self.paths, &staged, &loaded.rendered).map_err(|e| e.to_string())
    }

    /// Deletes removed masters once their sessions are gone (or the drain
    /// limit, `haproxy.hard_stop_after`, has passed).
    pub(super) async fn finish_draining(&mut self, stats: &Stats) {
        let Some(h) = &self.haproxy else { return };
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
                match runtime::delete(h, name).await {
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
