//! Which masters HAProxy balances over, and where each came from.
//!
//! The policy:
//!
//! - Until discovery has succeeded once since apilb started, the candidates
//!   are the static masters of apilb.yaml (the seeds) plus the set persisted
//!   by the last run: a node whose seeds are all gone still reaches the
//!   cluster, and a stale persisted list cannot hide the seeds.
//! - Once discovery has succeeded, the discovered set is authoritative: the
//!   API servers publish it themselves. It replaces the seeds and the
//!   persisted set, and a later failure of discovery keeps the last
//!   discovered set rather than going back to stale candidates.
//! - The set is never empty: discovery never reports an empty set (it is
//!   ignored), and the seeds are at least one master.
//!
//! Names are stable: a discovered or persisted address that is also a seed
//! keeps the seed's name; others are named after their address. A rename
//! would look like a removal plus an addition and cut connections.

use std::collections::HashSet;

use crate::config::{Address, Master, derive_name};

/// Where a master came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// The `masters` of apilb.yaml.
    Static,
    /// The `default/kubernetes` endpoints.
    Discovered,
    /// The set saved by a previous run.
    Persisted,
}

impl Source {
    /// Every source, for metrics.
    pub const ALL: [Source; 3] = [Source::Static, Source::Discovered, Source::Persisted];

    /// As shown in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::Discovered => "discovered",
            Source::Persisted => "persisted",
        }
    }
}

/// The inputs of the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// The static masters of apilb.yaml.
    pub seeds: Vec<Master>,
    /// The set saved by the previous run (only with discovery configured).
    pub persisted: Vec<Master>,
    /// The last discovered set; `None` until discovery first succeeds.
    pub discovered: Option<Vec<Address>>,
}

impl Sources {
    /// The masters HAProxy should balance over, in a stable order.
    pub fn desired(&self) -> Vec<Master> {
        let addresses: Vec<Address> = match &self.discovered {
            Some(d) => d.clone(),
            None => {
                let mut all: Vec<Address> = self.seeds.iter().map(|m| m.address.clone()).collect();
                for p in &self.persisted {
                    if !all.contains(&p.address) {
                        all.push(p.address.clone());
                    }
                }
                all
            }
        };
        let mut taken: HashSet<String> = HashSet::new();
        // Seed names first, so an address-derived name never takes one.
        for a in &addresses {
            if let Some(seed) = self.seeds.iter().find(|s| &s.address == a) {
                taken.insert(seed.name.clone());
            }
        }
        addresses
            .into_iter()
            .map(|address| {
                let name = match self.seeds.iter().find(|s| s.address == address) {
                    Some(seed) => seed.name.clone(),
                    None => unique_name(&address, &mut taken),
                };
                Master { name, address }
            })
            .collect()
    }

    /// Where a master of the desired set came from.
    pub fn source_of(&self, m: &Master) -> Source {
        if self.discovered.as_ref().is_some_and(|d| d.contains(&m.address)) {
            Source::Discovered
        } else if self.seeds.iter().any(|s| s.address == m.address) {
            Source::Static
        } else {
            Source::Persisted
        }
    }
}

fn unique_name(address: &Address, taken: &mut HashSet<String>) -> String {
    let base = derive_name(&address.host_str());
    let mut name = base.clone();
    if taken.contains(&name) {
        name = format!("{base}-{}", address.port);
    }
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{}-{n}", address.port);
        n += 1;
    }
    taken.insert(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, addr: &str) -> Master {
        Master { name: name.into(), address: addr.parse().unwrap() }
    }
    fn a(addr: &str) -> Address {
        addr.parse().unwrap()
    }

    #[test]
    fn before_discovery_seeds_and_persisted_are_candidates() {
        let s = Sources {
            seeds: vec![m("cp-1", "10.0.0.1:6443")],
            persisted: vec![m("10.0.0.1", "10.0.0.1:6443"), m("10.0.0.2", "10.0.0.2:6443")],
            discovered: None,
        };
        let d = s.desired();
        assert_eq!(d, vec![m("cp-1", "10.0.0.1:6443"), m("10.0.0.2", "10.0.0.2:6443")]);
        assert_eq!(s.source_of(&d[0]), Source::Static);
        assert_eq!(s.source_of(&d[1]), Source::Persisted);
    }

    #[test]
    fn after_discovery_the_discovered_set_is_authoritative_and_keeps_seed_names() {
        let s = Sources {
            seeds: vec![m("cp-1", "10.0.0.1:6443"), m("cp-9", "10.0.0.9:6443")],
            persisted: vec![m("10.0.0.7", "10.0.0.7:6443")],
            discovered: Some(vec![a("10.0.0.1:6443"), a("10.0.0.3:6443")]),
        };
        let d = s.desired();
        assert_eq!(d, vec![m("cp-1", "10.0.0.1:6443"), m("10.0.0.3", "10.0.0.3:6443")]);
        assert!(d.iter().all(|x| s.source_of(x) == Source::Discovered));
    }

    #[test]
    fn derived_names_never_collide() {
        let s = Sources {
            seeds: vec![m("10.0.0.1", "10.0.0.1:7443")],
            persisted: vec![],
            discovered: Some(vec![a("10.0.0.1:6443"), a("10.0.0.1:7443"), a("[fd00::1]:6443")]),
        };
        let names: Vec<String> = s.desired().into_iter().map(|x| x.name).collect();
        assert_eq!(names, ["10.0.0.1-6443", "10.0.0.1", "fd00--1"]);
    }
}
