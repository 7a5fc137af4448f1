//! What a change of the master set needs: servers added and drained at run
//! time, or a validated reload. Decided from the structured config, like
//! vector's `config/diff.rs`, never from the rendered text.

use crate::Loaded;
use crate::haproxy::runtime::{self, Change};
use crate::render::needs_resolvers;

/// How to get from the running config to the desired one.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Plan {
    /// Only servers differ: add, drain and delete them through the runtime
    /// API, no reload.
    Runtime(Change),
    /// Anything else: a validated reload.
    Reload(Change),
}

impl Plan {
    /// The masters that change, whichever way.
    pub(super) fn change(&self) -> &Change {
        match self {
            Plan::Runtime(c) | Plan::Reload(c) => c,
        }
    }
}

/// Chooses between a runtime change and a reload, for a change of the
/// masters from those of `applied` to those of `desired`. `running` is what
/// HAProxy runs, when known (an adopted master running an older config is
/// not): servers change at run time only against a known config.
pub(super) fn plan(running: Option<&Loaded>, applied: &Loaded, desired: &Loaded) -> Plan {
    let change = runtime::diff(&applied.config.masters, &desired.config.masters);
    // A DNS name needs the resolvers section and `init-addr`, which only a
    // reload brings.
    let dns_added = change.added.iter().any(|m| m.address.is_dns());
    match running {
        Some(running) if !dns_added && same_but_masters(running, desired) => Plan::Runtime(change),
        _ => Plan::Reload(change),
    }
}

/// True when everything HAProxy's config is made of, but the masters'
/// server lines, is the same: settings, the files they name, the HAProxy
/// features rendered for, and the sections the set implies.
fn same_but_masters(a: &Loaded, b: &Loaded) -> bool {
    let mut config = a.config.clone();
    config.masters.clone_from(&b.config.masters);
    config == b.config
        && a.inputs == b.inputs
        && a.rendered.features == b.rendered.features
        && needs_resolvers(&a.config.masters) == needs_resolvers(&b.config.masters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Master;
    use crate::layout::Paths;
    use crate::render::Features;

    fn loaded(yaml: &str, features: Features) -> Loaded {
        let config = crate::config::Config::parse(yaml, "test").expect("config parses");
        let inputs = crate::inputs::Inputs::gather(&config).expect("inputs");
        let paths = Paths::from_config(&config);
        crate::assemble(config, inputs, &paths, features)
    }

    fn with_masters(base: &Loaded, masters: &[&str]) -> Loaded {
        let mut config = base.config.clone();
        config.masters = masters
            .iter()
            .map(|a| {
                let address = a.parse().expect("address");
                Master { name: crate::config::derive_name(a.split(':').next().unwrap_or(a)), address }
            })
            .collect();
        crate::assemble(
            config,
            base.inputs.clone(),
            &Paths::from_config(&base.config),
            base.rendered.features,
        )
    }

    const YAML: &str =
        "masters: [10.0.0.1:6443, 10.0.0.2:6443]\nhealth:\n  tls:\n    insecure_skip_verify: true\n";

    #[test]
    fn servers_alone_change_at_run_time() {
        let running = loaded(YAML, Features::default());
        let desired = with_masters(&running, &["10.0.0.1:6443", "10.0.0.3:6443"]);
        let Plan::Runtime(change) = plan(Some(&running), &running, &desired) else {
            panic!("expected a runtime change");
        };
        assert_eq!(change.added.len(), 1);
        assert_eq!(change.removed.len(), 1);
    }

    #[test]
    fn anything_else_reloads() {
        let running = loaded(YAML, Features::default());
        // Unknown running config (adopted, older).
        assert!(matches!(plan(None, &running, &running), Plan::Reload(_)));
        // A setting changed along with the set.
        let mut other = with_masters(&running, &["10.0.0.3:6443"]);
        other.config.haproxy.maxconn += 1;
        assert!(matches!(plan(Some(&running), &running, &other), Plan::Reload(_)));
        // Another HAProxy (features) under the same settings.
        let mut newer = with_masters(&running, &["10.0.0.3:6443"]);
        newer.rendered.features.shutdown_sessions_on_mark_down =
            !running.rendered.features.shutdown_sessions_on_mark_down;
        assert!(matches!(plan(Some(&running), &running, &newer), Plan::Reload(_)));
        // A DNS name joins: resolvers and init-addr need a reload.
        let dns = with_masters(&running, &["10.0.0.1:6443", "api.example.com:6443"]);
        assert!(matches!(plan(Some(&running), &running, &dns), Plan::Reload(_)));
        // The last DNS name leaves: the resolvers section goes.
        let from_dns = with_masters(&running, &["10.0.0.1:6443", "api.example.com:6443"]);
        let back = with_masters(&from_dns, &["10.0.0.1:6443"]);
        assert!(matches!(plan(Some(&from_dns), &from_dns, &back), Plan::Reload(_)));
    }
}
