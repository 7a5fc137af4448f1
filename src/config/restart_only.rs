//! Settings a running agent cannot change, and how each one takes effect
//! while the data plane keeps serving. The one list behind the agent's
//! refusal message, the docs (tests/docs.rs checks them against it) and
//! the man page apilb.yaml(5).

use super::Config;

/// The command that hands the running agent over to a new one (the new one
/// reads the file at start): HAProxy keeps serving and is adopted.
pub const HANDOVER: &str = "systemctl kill --kill-whom=main --signal=SIGUSR2 apilb";

/// How a change to a restart-only setting takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// A handover ([`HANDOVER`]): no connection is touched.
    Handover,
    /// A new HAProxy: `systemctl restart apilb`, which drops every
    /// connection of the node once.
    Restart,
}

/// One setting the running agent keeps as it was at start.
#[derive(Clone, Copy, Debug)]
pub struct RestartOnly {
    /// Its dotted path in apilb.yaml.
    pub key: &'static str,
    /// Why the running agent cannot change it.
    pub why: &'static str,
    /// How the change takes effect.
    pub apply: Apply,
    /// What else it needs under the packaged systemd unit, if anything.
    pub unit_note: Option<&'static str>,
    /// Reads the setting, to tell a change.
    pub get: fn(&Config) -> String,
}

impl RestartOnly {
    /// The command an operator runs, with what it costs.
    pub fn how(&self) -> String {
        let command = match self.apply {
            Apply::Handover => format!("hand over to a new agent ({HANDOVER}); HAProxy keeps serving"),
            Apply::Restart => "restart HAProxy (systemctl restart apilb), which drops every connection of \
                               the node once"
                .to_owned(),
        };
        match self.unit_note {
            Some(note) => format!("{command}; {note}"),
            None => command,
        }
    }
}

/// Under `ProtectSystem=strict` the unit can write only its own two
/// directories.
const UNIT_WRITABLE: &str = "under the packaged unit (ProtectSystem=strict) also allow the new directory \
                             with ReadWritePaths= in a drop-in (systemctl edit apilb)";

/// Every restart-only setting.
pub const RESTART_ONLY: [RestartOnly; 4] = [
    RestartOnly {
        key: "metrics.listen",
        why: "the agent binds it once, before anything else",
        apply: Apply::Handover,
        unit_note: None,
        get: |c| c.metrics.listen.to_string(),
    },
    RestartOnly {
        key: "haproxy.state_dir",
        why: "the agent keeps its files there from its start",
        apply: Apply::Handover,
        unit_note: Some(UNIT_WRITABLE),
        get: |c| c.haproxy.state_dir.display().to_string(),
    },
    RestartOnly {
        key: "haproxy.binary",
        why: "HAProxy re-executes the binary it was started with on every reload, so only a new HAProxy \
              runs another one",
        apply: Apply::Restart,
        unit_note: None,
        get: |c| c.haproxy.binary.display().to_string(),
    },
    RestartOnly {
        key: "haproxy.runtime_dir",
        why: "the next agent finds the running HAProxy there; one looking elsewhere would start a second \
              HAProxy, which cannot bind the port",
        apply: Apply::Restart,
        unit_note: Some(UNIT_WRITABLE),
        get: |c| c.haproxy.runtime_dir.display().to_string(),
    },
];

/// The restart-only settings that differ between `running` and `new`.
pub fn changed(running: &Config, new: &Config) -> Vec<&'static RestartOnly> {
    RESTART_ONLY.iter().filter(|r| (r.get)(running) != (r.get)(new)).collect()
}

/// The agent's message for such a change: what stays, why, and how to
/// apply it.
pub fn refusal(running: &Config, new: &Config) -> Option<String> {
    let changed = changed(running, new);
    if changed.is_empty() {
        return None;
    }
    let parts: Vec<String> = changed
        .iter()
        .map(|r| {
            format!(
                "{} changed to {:?} but stays {:?} in the running agent ({}); to apply it, {}",
                r.key,
                (r.get)(new),
                (r.get)(running),
                r.why,
                r.how()
            )
        })
        .collect();
    Some(parts.join(". "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(
            &format!("masters: [10.0.0.1:6443]\nhealth: {{tls: {{insecure_skip_verify: true}}}}\n{extra}"),
            "t",
        )
        .unwrap()
    }

    #[test]
    fn a_change_names_the_key_and_a_command_that_keeps_serving() {
        let a = config("");
        assert!(refusal(&a, &a).is_none());
        let b = config("metrics: {listen: 127.0.0.1:9999}\n");
        let msg = refusal(&a, &b).unwrap();
        assert!(
            msg.starts_with("metrics.listen changed to \"127.0.0.1:9999\" but stays \"127.0.0.1:9716\""),
            "{msg}"
        );
        assert!(msg.contains(HANDOVER) && !msg.contains("systemctl restart"), "{msg}");
        let c = config("haproxy: {binary: /opt/haproxy}\n");
        let msg = refusal(&a, &c).unwrap();
        assert!(msg.contains("haproxy.binary") && msg.contains("drops every connection"), "{msg}");
        let d = config("haproxy: {runtime_dir: /run/other}\n");
        assert!(refusal(&a, &d).unwrap().contains("ReadWritePaths="));
    }
}
