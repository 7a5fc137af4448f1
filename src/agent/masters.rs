//! The master set: discovery reports, the policy's desired set, and
//! changes through HAProxy's runtime API (or a reload).

use std::time::Duration;

use tokio::sync::mpsc;

use super::diff::Plan;
use super::{Agent, unix_now};
use crate::config::Master;
use crate::discovery::{self, persist};
use crate::layout::Paths;
use crate::masters::Sources;
use crate::render::{FALLBACK_SUFFIX, Features};
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

/// The masters of a running haproxy.cfg (an older agent's), as a config to
/// adopt: only when re-rendering `base`'s config and inputs with them
/// reproduces the running file exactly (same fingerprint), so nothing but
/// the set differs.
pub(super) fn running_set(
    running_text: &str,
    running_fingerprint: &str,
    base: &Loaded,
    paths: &Paths,
) -> Option<Loaded> {
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
        Ok(effective(yaml, inputs, &self.sources, &self.paths, self.supervisor.features()))
    }

    /// (Re)starts the discovery watcher for the config in effect.
    pub(super) fn restart_discovery(&mut self) {
        self.stop_discovery();
        let config = &self.reconciler.applied.loaded.config;
        let Some(settings) = config.discovery.kubernetes.clone() else {
            self.observer.status.discovery = None;
            self.observer.metrics.discovery_enabled.set(0);
            return;
        };
        self.observer.metrics.discovery_enabled.set(1);
        let (tx, rx) = mpsc::channel(16);
        let opts = discovery::Options {
            settings,
            local: crate::status_client::target(config.listen.0),
            server_name: config.health.tls.server_name().to_owned(),
            watch_timeout: Duration::from_secs(290),
        };
        self.discovery = Some(discovery::spawn(opts, tx));
        self.discovery_rx = Some(rx);
        self.observer.status.discovery.get_or_insert_with(DiscoveryStatus::default);
    }

    pub(super) fn stop_discovery(&mut self) {
        if let Some(task) = self.discovery.take() {
            task.abort();
        }
        self.discovery_rx = None;
    }

    /// A report from the discovery watcher.
    pub(super) async fn on_discovery(&mut self, update: discovery::Update) {
        let metrics = &self.observer.metrics;
        let status = self.observer.status.discovery.get_or_insert_with(DiscoveryStatus::default);
        match update {
            discovery::Update::Found { addresses, refused, api } => {
                let now = unix_now();
                status.api = api.to_owned();
                status.last_success = Some(now);
                status.last_error = None;
                metrics.discovery_last_success_timestamp_seconds.set(now);
                if !refused.is_empty() && status.refused != refused {
                    tracing::warn!("discovery refused addresses the API listed: {}", refused.join("; "));
                }
                status.refused = refused;
                status.rejected = None;
                metrics.discovery_rejected.set(0);
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
                metrics.discovery_last_success_timestamp_seconds.set(now);
            }
            discovery::Update::Restarted(why) => {
                status.watch_restarts += 1;
                status.last_error = Some(why.clone());
                metrics.discovery_watch_restarts_total.inc();
                tracing::warn!("discovery watch restarted: {why}");
            }
            discovery::Update::Rejected(why) => {
                tracing::warn!("discovery: {why}");
                status.rejected = Some(why);
                metrics.discovery_rejected.set(1);
            }
            discovery::Update::Failing(why) => {
                status.last_error = Some(why.clone());
                if self.last_discovery_problem.as_deref() != Some(&why) {
                    tracing::warn!("discovery: {why}");
                    self.last_discovery_problem = Some(why);
                }
            }
        }
        self.observer.publish();
    }

    /// Brings HAProxy's masters in line with the policy: through the
    /// runtime API when only servers change, else by a validated reload.
    pub(super) async fn apply_masters(&mut self) {
        let desired = self.sources.desired();
        let Some((loaded, plan)) = self.reconciler.with_masters(desired, self.supervisor.features()) else {
            // Same servers; sources may have changed (static → discovered).
            self.config_in_effect();
            return;
        };
        let changed = plan.change().len() as u64;
        if let Plan::Runtime(change) = &plan
            && self.supervisor.haproxy().is_some()
        {
            let hash = loaded.rendered.short_hash().to_owned();
            match self.reconciler.change_at_runtime(&self.supervisor, loaded.clone(), change).await {
                Ok(()) => {
                    let names = |v: Vec<String>| if v.is_empty() { "-".to_owned() } else { v.join(", ") };
                    tracing::info!(
                        added = %names(change.added.iter().map(|m| format!("{} ({})", m.name, m.address)).collect()),
                        removed = %names(change.removed.clone()),
                        config = hash,
                        "masters changed through HAProxy's runtime API (no reload); removed ones drain"
                    );
                    self.observer
                        .metrics
                        .master_changes_total
                        .with_label_values(&["runtime"])
                        .inc_by(changed);
                    self.config_in_effect();
                    return;
                }
                Err(e) => {
                    tracing::warn!("cannot change the masters at run time ({e}); falling back to a reload")
                }
            }
        }
        let fingerprint = loaded.rendered.fingerprint.clone();
        self.apply(loaded, "the master set changed").await;
        if self.reconciler.running.fingerprint == fingerprint {
            self.observer.metrics.master_changes_total.with_label_values(&["reload"]).inc_by(changed);
            // A reload dropped the draining servers from the new worker.
            self.reconciler.draining.clear();
        }
    }

    /// Records the config in effect, and keeps what discovery taught for
    /// the next start.
    pub(super) fn config_in_effect(&mut self) {
        self.sync_checks();
        let applied = &self.reconciler.applied;
        self.observer.config_in_effect(applied, &self.sources);
        let masters = &applied.loaded.config.masters;
        if self.sources.discovered.is_some()
            && applied.loaded.config.discovery.kubernetes.is_some()
            && let Err(e) = persist::save(&self.paths.masters_file(), masters)
        {
            tracing::warn!(error = %e, "cannot save the master set; the next start uses the seeds only");
        }
    }
}
