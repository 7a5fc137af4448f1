//! The agent's picture of the node: what `/status` serves, what
//! `apilb status` prints and what `/readyz` and systemd's STATUS= derive
//! from.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::haproxy::stat::ServerState;
use crate::masters::Source;

/// Everything an operator needs to see at a glance.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// apilb's version.
    pub version: String,
    /// The local endpoint.
    pub listen: String,
    /// The HAProxy process.
    pub haproxy: HaproxyStatus,
    /// The configuration in effect.
    pub config: ConfigStatus,
    /// How the check authenticates and verifies.
    pub check: CheckStatus,
    /// One entry per master, in config order.
    pub masters: Vec<MasterStatus>,
    /// Discovery, when configured.
    #[serde(default)]
    pub discovery: Option<DiscoveryStatus>,
}

/// What discovery is doing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiscoveryStatus {
    /// `endpointslices` or `endpoints`, once known.
    pub api: String,
    /// When it last succeeded (seconds since the epoch).
    pub last_success: Option<f64>,
    /// The last problem, when the last attempt failed.
    pub last_error: Option<String>,
    /// Addresses the API listed but apilb refused, with the reason.
    pub refused: Vec<String>,
    /// Why the API's current answer is refused as a whole, while it is:
    /// the masters in use stay.
    #[serde(default)]
    pub rejected: Option<String>,
    /// Times the watch started over.
    pub watch_restarts: u64,
}

/// The HAProxy process tree.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HaproxyStatus {
    /// True while the master runs and answers.
    pub running: bool,
    /// HAProxy's version.
    pub version: String,
    /// The master's pid.
    pub master_pid: Option<u32>,
    /// Pids of the workers that accept new connections.
    pub workers: Vec<u32>,
    /// Workers from before a reload still finishing connections.
    pub old_workers: Vec<u32>,
    /// True while HAProxy's master reports that its last reload failed:
    /// the worker from before it serves on (HAProxy 3.1+ calls this
    /// recovery mode and lists that worker among its old workers; it is
    /// in `workers` here).
    #[serde(default)]
    pub last_reload_failed: bool,
    /// True when this agent adopted a running master.
    pub adopted: bool,
    /// Times apilb restarted HAProxy after it died.
    pub restarts: u64,
    /// True while the frontend accepts connections.
    pub frontend_open: bool,
}

/// The configuration in effect and the last attempt to change it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigStatus {
    /// The YAML file.
    pub path: String,
    /// SHA-256 of the haproxy.cfg HAProxy runs.
    pub hash: String,
    /// SHA-256 of the apilb.yaml settings in effect (see
    /// `Config::settings_hash`): equal on nodes that share a config.
    #[serde(default)]
    pub settings_hash: String,
    /// When it was applied (seconds since the epoch).
    pub applied_at: Option<f64>,
    /// The last reload attempt.
    pub last_reload: Option<ReloadRecord>,
    /// Why the current config file is not applied, if it is not.
    pub pending_error: Option<String>,
    /// Reload requests (SIGHUP) handled so far. `apilb reload` waits for
    /// this to move, then reads the outcome from `pending_error`.
    #[serde(default)]
    pub reload_requests: u64,
}

/// One reload attempt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReloadRecord {
    /// When (seconds since the epoch).
    pub at: f64,
    /// `success`, `invalid_config`, `refused` or `failed`.
    pub result: ReloadResult,
    /// Details for anything but success.
    pub message: Option<String>,
}

/// The check's credential and verification.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CheckStatus {
    /// `none`, `bearer`, `client_cert` or `bootstrap`.
    pub auth: String,
    /// Where the credential came from.
    pub source: String,
    /// True when the servers' certificates are verified.
    pub verified: bool,
}

/// One master as HAProxy sees it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MasterStatus {
    /// Its name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// Where it came from: `static`, `discovered` or `persisted`; or
    /// `removed (draining)` for a removed master finishing its connections.
    pub source: Membership,
    /// UP, DOWN, MAINT or DRAIN; `unknown` before the first poll.
    pub state: MasterState,
    /// HAProxy's check status code, e.g. L7OK, L4CON, L6TOUT, L7STS.
    pub check_status: String,
    /// HAProxy's description of it, e.g. "Layer7 wrong status".
    pub check_desc: String,
    /// HTTP status of the last check.
    pub check_code: Option<u16>,
    /// Extra detail, e.g. "Connection refused".
    pub check_info: String,
    /// Duration of the last check in milliseconds.
    pub check_duration_ms: Option<u64>,
    /// Seconds since the last state change.
    pub since_change_s: Option<u64>,
    /// Current connections through the checked server.
    pub sessions: u64,
    /// Current connections through its fail-open twin.
    pub fallback_sessions: u64,
    /// Connection errors counted by the worker that serves, on the checked
    /// server and its fail-open twin.
    pub connect_errors: u64,
}

/// How a change of configuration ended: the label of
/// `apilb_haproxy_reloads_total` and of the status's last reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    /// HAProxy runs the new config (or will at its next start).
    Success,
    /// apilb.yaml or a file it names is unusable, or the change needs a
    /// restart: HAProxy was not asked.
    InvalidConfig,
    /// HAProxy refused the config (`haproxy -c` or the reload).
    Refused,
    /// A step failed: a file could not be written, the state could not be
    /// saved, HAProxy was busy or did not answer.
    Failed,
}

impl ReloadResult {
    /// Every result, so the metric's series exist from the start.
    pub const ALL: [ReloadResult; 4] =
        [ReloadResult::Success, ReloadResult::InvalidConfig, ReloadResult::Refused, ReloadResult::Failed];

    /// As shown in status, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Success => "success",
            ReloadResult::InvalidConfig => "invalid_config",
            ReloadResult::Refused => "refused",
            ReloadResult::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// A master's state as last polled; `unknown` (JSON) before the first
/// poll that lists it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MasterState {
    /// Not polled yet, or HAProxy did not list it.
    #[default]
    Unknown,
    /// HAProxy's state.
    Known(ServerState),
}

impl MasterState {
    /// As shown in status: UP, DOWN, MAINT, DRAIN or unknown.
    pub fn as_str(self) -> &'static str {
        match self {
            MasterState::Unknown => "unknown",
            MasterState::Known(s) => s.as_str(),
        }
    }

    fn parse(text: &str) -> Option<Self> {
        if text == MasterState::Unknown.as_str() {
            return Some(MasterState::Unknown);
        }
        ServerState::ALL.into_iter().find(|s| s.as_str() == text).map(MasterState::Known)
    }
}

/// Why a master is listed: it is in the set (and where it came from), or
/// it was removed and still finishes its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// In the set HAProxy balances over.
    Member(Source),
    /// Removed from the set; deleted from HAProxy once its sessions end.
    Draining,
}

impl Default for Membership {
    /// A static master: the placeholder of [`MasterStatus::default`].
    fn default() -> Self {
        Membership::Member(Source::Static)
    }
}

impl Membership {
    /// As shown in status: `static`, `discovered`, `persisted` or
    /// `removed (draining)`.
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Member(s) => s.as_str(),
            Membership::Draining => "removed (draining)",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        if text == Membership::Draining.as_str() {
            return Some(Membership::Draining);
        }
        Source::ALL.into_iter().find(|s| s.as_str() == text).map(Membership::Member)
    }
}

/// Status fields that are enums in the code and strings in the JSON:
/// `as_str` and `parse` are each type's one mapping; comparison with a
/// string, `Display` and serde follow from them.
macro_rules! text_enums {
    ($($t:ty: $what:literal),* $(,)?) => {$(
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                <$t>::parse(&text)
                    .ok_or_else(|| serde::de::Error::custom(format!("unknown {} {text:?}", $what)))
            }
        }
    )*};
}

text_enums!(ReloadResult: "reload result", MasterState: "master state", Membership: "master source");

impl Status {
    /// Masters in rotation that are UP (removed, draining ones excluded).
    pub fn healthy(&self) -> usize {
        self.in_rotation().filter(|m| m.state == MasterState::Known(ServerState::Up)).count()
    }

    /// The masters in the set (not the removed ones still draining).
    pub fn in_rotation(&self) -> impl Iterator<Item = &MasterStatus> {
        self.masters.iter().filter(|m| m.source != Membership::Draining)
    }

    /// `Ok` when the local endpoint serves through at least one healthy
    /// master; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.haproxy.running {
            return Err("HAProxy is not running".into());
        }
        if !self.haproxy.frontend_open {
            return Err(format!("the frontend on {} is not accepting connections", self.listen));
        }
        if self.healthy() == 0 {
            return Err(format!(
                "no healthy master (0/{}); connections fail open to every master",
                self.in_rotation().count()
            ));
        }
        Ok(())
    }

    /// One line for systemd's STATUS=, e.g. "3/3 masters up".
    pub fn summary(&self) -> String {
        let mut s = format!("{}/{} masters up", self.healthy(), self.in_rotation().count());
        if !self.haproxy.running {
            s = format!("HAProxy not running; {s}");
        }
        if self.check.auth == "bootstrap" {
            s.push_str("; bootstrap checks (no credential yet)");
        }
        if self.discovery.as_ref().is_some_and(|d| d.rejected.is_some()) {
            s.push_str("; discovered masters rejected");
        }
        if self.config.pending_error.is_some() {
            s.push_str("; config change rejected");
        } else if self.haproxy.last_reload_failed {
            s.push_str("; HAProxy's last reload failed");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_fields_keep_their_json_strings() {
        let m = MasterStatus {
            source: Membership::Member(Source::Discovered),
            state: MasterState::Known(ServerState::Down),
            ..MasterStatus::default()
        };
        let json = serde_json::to_value(&m).expect("serializes");
        assert_eq!(json["source"], "discovered");
        assert_eq!(json["state"], "DOWN");
        let draining = MasterStatus { source: Membership::Draining, ..MasterStatus::default() };
        let json = serde_json::to_value(&draining).expect("serializes");
        assert_eq!(json["source"], "removed (draining)");
        assert_eq!(json["state"], "unknown");
        let back: MasterStatus = serde_json::from_value(json).expect("parses");
        assert_eq!(back, draining);
        let record = ReloadRecord { at: 1.0, result: ReloadResult::InvalidConfig, message: None };
        assert_eq!(serde_json::to_value(&record).expect("serializes")["result"], "invalid_config");
        let mut bad = serde_json::to_value(&m).expect("serializes");
        bad["state"] = "SIDEWAYS".into();
        assert!(serde_json::from_value::<MasterStatus>(bad).is_err());
    }
}
