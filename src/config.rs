//! The configuration file: its schema, defaults and validation.
//!
//! Parsing happens in two layers:
//!
//! 1. Each field's own rules (an address has a port, a duration has a unit,
//!    a name uses only safe characters) live in that field's `Deserialize`
//!    impl. serde_yaml then reports the failure with the field's path and
//!    the line, e.g. `masters[2]: "10.0.0.3" has no port … at line 4 column 5`.
//! 2. Rules that span fields (no duplicate masters, a CA unless verification
//!    is explicitly off) run in [`Config::validate`] and name the field path;
//!    every broken one is reported at once (one line each).
//!
//! Nothing here touches the network or binds a port; files referenced by the
//! config (CA, token, certificates, passwords) are read later, by
//! [`crate::credentials`] and [`crate::render`], so that `apilb check` and the
//! daemon report missing files with the same message.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Where the daemon and the CLI look for the config unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/apilb/apilb.yaml";

/// Environment variable that overrides [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "APILB_CONFIG";

/// Longest path a unix socket may have (`sun_path` is 108 bytes with the NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Everything that can be wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all (missing, permissions, not UTF-8).
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The config file apilb tried to read.
        path: PathBuf,
        /// Why the read failed.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, or a field breaks its own rules. serde_yaml's
    /// message already names the field path and the line.
    #[error("{origin}: {source}")]
    Parse {
        /// The file (or `<inline>` for text given directly).
        origin: String,
        /// serde_yaml's error, which carries the path and position.
        #[source]
        source: serde_yaml::Error,
    },
    /// A rule spanning several fields is broken.
    #[error("{origin}: {field}: {message}")]
    Invalid {
        /// The file (or `<inline>`).
        origin: String,
        /// Dotted path of the offending field, e.g. `masters[2].name`.
        field: String,
        /// What is wrong, in words a user can act on.
        message: String,
    },
    /// Several rules spanning fields are broken: all are reported at once,
    /// one line each, so one edit can fix them all.
    #[error("{}", problems.iter().map(|p| format!("{origin}: {p}")).collect::<Vec<_>>().join("\n"))]
    InvalidMany {
        /// The file (or `<inline>`).
        origin: String,
        /// Every broken rule, in the order the fields are checked.
        problems: Vec<FieldProblem>,
    },
}

/// A setting's field path and its value as text.
type FieldText = (String, String);

/// One broken cross-field rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldProblem {
    /// Dotted path of the offending field, e.g. `masters[2].name`.
    pub field: String,
    /// What is wrong, in words a user can act on.
    pub message: String,
}

/// The problems found by [`Config::validate`], at most one per field (the
/// first: a later rule on the same field often follows from it).
#[derive(Default)]
struct Problems(Vec<FieldProblem>);

impl Problems {
    /// Records that `field` breaks a rule, unless it already broke one.
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        if !self.0.iter().any(|p| p.field == field) {
            self.0.push(FieldProblem { field, message: message.into() });
        }
    }
}

/// The whole configuration, as written in `apilb.yaml` (after defaults).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where HAProxy's frontend accepts the node's API clients. Loopback by
    /// default so nothing off the node can use the node as a relay.
    #[serde(default = "default_listen")]
    pub listen: Listen,
    /// The API servers. Every one of them gets a checked `server` line and a
    /// fail-open `backup` twin.
    #[serde(deserialize_with = "deserialize_masters")]
    pub masters: Vec<Master>,
    /// How new connections are spread over healthy masters.
    #[serde(default)]
    pub balance: Balance,
    /// The active `/readyz` check.
    #[serde(default)]
    pub health: Health,
    /// HAProxy's connection timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// HAProxy's own stats page and Prometheus exporter; off unless present.
    #[serde(default)]
    pub stats: Option<Stats>,
    /// apilb's HTTP endpoint (/metrics, /healthz, /readyz, /status).
    #[serde(default)]
    pub metrics: Metrics,
    /// Where HAProxy lives and where apilb keeps its files.
    #[serde(default)]
    pub haproxy: HaproxySettings,
    /// Learning the masters from the cluster; off unless present.
    #[serde(default)]
    pub discovery: Discovery,
    /// Endpoints the operator chose to serve off loopback. Binding `listen`
    /// or `metrics.listen` to another address without naming it here is an
    /// error: an exposure has to be meant, not a typo.
    #[serde(default)]
    pub expose: Vec<Exposed>,
}

/// An endpoint that may be bound off loopback.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Exposed {
    /// `listen`: the node's endpoint for the Kubernetes API.
    Listen,
    /// `metrics.listen`: /metrics, /healthz and /readyz (never /status,
    /// which only same-host clients get).
    Metrics,
}

impl Exposed {
    /// As written in apilb.yaml.
    pub fn as_str(self) -> &'static str {
        match self {
            Exposed::Listen => "listen",
            Exposed::Metrics => "metrics",
        }
    }
}

/// Where masters can be learned from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    /// Watch the `default/kubernetes` EndpointSlices.
    #[serde(default)]
    pub kubernetes: Option<KubernetesDiscovery>,
}

/// Watching the API servers' own endpoints.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesDiscovery {
    /// A kubeconfig whose identity may list and watch EndpointSlices in
    /// `default`. Default: the first that exists of the k3s and RKE2
    /// kube-proxy kubeconfigs (`system:kube-proxy`, bound to
    /// `system:node-proxier`).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// How to reach the API: through apilb's own frontend (`local`, the
    /// default: it needs no other route and survives the loss of any
    /// master) or at the kubeconfig's server (`kubeconfig`).
    #[serde(default)]
    pub via: Via,
    /// Addresses outside these networks are refused (e.g. the masters'
    /// subnet). Empty: any address but loopback, link-local, unspecified
    /// and multicast ones, which are refused unless a network listed here
    /// lies inside their range (e.g. `127.0.0.0/8` for a lab on one host).
    #[serde(default)]
    pub allowed_cidrs: Vec<Cidr>,
    /// The most masters a discovered set may hold; a larger one is refused
    /// as a whole and the masters in use stay. Every node checks every
    /// master, so a forged list of hundreds would multiply the checks.
    #[serde(default = "default_max_masters")]
    pub max_masters: usize,
}

fn default_max_masters() -> usize {
    16
}

/// The kubeconfigs tried, in order, when `discovery.kubernetes.kubeconfig`
/// is not set.
pub const DEFAULT_DISCOVERY_KUBECONFIGS: [&str; 2] =
    ["/var/lib/rancher/k3s/agent/kubeproxy.kubeconfig", "/var/lib/rancher/rke2/agent/kubeproxy.kubeconfig"];

/// Where discovery sends its requests.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// apilb's own frontend (`listen`).
    #[default]
    Local,
    /// The `server` of the kubeconfig.
    Kubeconfig,
}

/// An IP network, `10.0.0.0/8` or `fd00::/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// True when `ip` is inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("\"{s}\" is not a network like 10.0.0.0/8 or fd00::/64");
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("\"{s}\": the prefix length is at most {max}"));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, str::parse, "a network such as 10.0.0.0/8")
    }
}

fn default_listen() -> Listen {
    Listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 16443)))
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates YAML text; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                field: "masters".to_owned(),
                message: "the file is empty; at least one master is required".to_owned(),
            });
        }
        let config: Config = serde_yaml::from_str(text)
            .map_err(|source| ConfigError::Parse { origin: origin.to_owned(), source })?;
        let mut problems = config.validate();
        match problems.len() {
            0 => Ok(config),
            1 => {
                let FieldProblem { field, message } = problems.remove(0);
                Err(ConfigError::Invalid { origin: origin.to_owned(), field, message })
            }
            _ => Err(ConfigError::InvalidMany { origin: origin.to_owned(), problems }),
        }
    }

    /// SHA-256 of the settings, as they shape the data plane: everything in
    /// the file except `metrics` (often the node's own address). Nodes that
    /// share an apilb.yaml report the same value even when each renders its
    /// own client certificate into haproxy.cfg, so fleets can spot drift.
    pub fn settings_hash(&self) -> String {
        let mut shaping = self.clone();
        shaping.metrics = Metrics::default();
        // Serializing plain structs and vectors cannot fail.
        let json = serde_json::to_vec(&shaping).unwrap_or_default();
        crate::digest::sha256_hex(&json)
    }

    /// Cross-field rules. Returns every broken one (the field's path and a
    /// message), at most one per field; empty when the config is valid.
    fn validate(&self) -> Vec<FieldProblem> {
        let mut p = Problems::default();
        self.validate_masters(&mut p);
        self.validate_health(&mut p);
        self.validate_ranges(&mut p);
        self.validate_listeners(&mut p);
        self.validate_dirs(&mut p);
        self.validate_text(&mut p);
        p.0
    }

    /// At least one master; no address or name twice.
    fn validate_masters(&self, p: &mut Problems) {
        if self.masters.is_empty() {
            p.add("masters", "at least one master is required, e.g. `- 10.0.0.1:6443`");
        }
        let mut by_address: HashMap<String, usize> = HashMap::new();
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        for (i, m) in self.masters.iter().enumerate() {
            if let Some(j) = by_address.insert(m.address.key(), i) {
                p.add(format!("masters[{i}]"), format!("{} is listed twice (also masters[{j}])", m.address));
                // Its name, derived from the address, repeats too.
                continue;
            }
            if let Some(j) = by_name.insert(&m.name, i) {
                p.add(
                    format!("masters[{i}].name"),
                    format!(
                        "\"{}\" is used twice (also masters[{j}]); give each master its own name",
                        m.name
                    ),
                );
            }
        }
    }

    /// The check's verification, credential and expected statuses agree.
    fn validate_health(&self, p: &mut Problems) {
        let tls = &self.health.tls;
        if tls.ca_file.is_none() && !tls.insecure_skip_verify && self.health.auth.mode != AuthMode::Auto {
            p.add(
                "health.tls.ca_file",
                "is required to verify the API servers' certificate; set it, or set \
                 health.tls.insecure_skip_verify: true to check without verification",
            );
        }
        if tls.ca_file.is_some() && tls.insecure_skip_verify {
            p.add("health.tls.insecure_skip_verify", "is true but ca_file is set; remove one of them");
        }
        let auth = &self.health.auth;
        match auth.mode {
            AuthMode::Bearer if auth.token_file.is_none() => {
                p.add("health.auth.token_file", "is required when health.auth.mode is bearer")
            }
            AuthMode::ClientCert if auth.cert_file.is_none() => {
                p.add("health.auth.cert_file", "is required when health.auth.mode is client_cert")
            }
            AuthMode::None if auth.token_file.is_some() || auth.cert_file.is_some() => p.add(
                "health.auth.mode",
                "is none, but token_file or cert_file is set; use bearer, client_cert or auto",
            ),
            _ => {}
        }
        if auth.key_file.is_some() && auth.cert_file.is_none() {
            p.add("health.auth.key_file", "is set without health.auth.cert_file");
        }
        if self.health.expect_status.is_empty() {
            p.add("health.expect_status", "needs at least one status code, e.g. [200]");
        }
        if self.health.backstop_interval.as_millis() < self.health.interval.as_millis() {
            p.add(
                "health.backstop_interval",
                format!(
                    "{} is shorter than health.interval ({}); the backstop checks less often than the checker",
                    self.health.backstop_interval, self.health.interval
                ),
            );
        }
    }

    /// Durations, counts and limits within their ranges.
    fn validate_ranges(&self, p: &mut Problems) {
        for (field, d, min_ms) in [
            ("health.interval", self.health.interval, 100),
            ("health.timeout", self.health.timeout, 100),
            ("timeouts.connect", self.timeouts.connect, 100),
            ("timeouts.client", self.timeouts.client, 1000),
            ("timeouts.server", self.timeouts.server, 1000),
            ("haproxy.hard_stop_after", self.haproxy.hard_stop_after, 1000),
        ] {
            if d.as_millis() < min_ms {
                p.add(field, format!("{d} is too short; the minimum is {min_ms}ms"));
            }
        }
        for (field, v) in [("health.rise", self.health.rise), ("health.fall", self.health.fall)] {
            if !(1..=100).contains(&v) {
                p.add(field, format!("{v} is out of range 1..=100"));
            }
        }
        if !(1..=1_000_000).contains(&self.haproxy.maxconn) {
            p.add("haproxy.maxconn", format!("{} is out of range 1..=1000000", self.haproxy.maxconn));
        }
        if let Some(k) = &self.discovery.kubernetes
            && !(1..=256).contains(&k.max_masters)
        {
            p.add("discovery.kubernetes.max_masters", format!("{} is out of range 1..=256", k.max_masters));
        }
    }

    /// Listeners do not collide, and none is exposed off the node unless
    /// the config says so.
    fn validate_listeners(&self, p: &mut Problems) {
        if let Some(stats) = &self.stats {
            if !stats.listen.0.ip().is_loopback() && stats.auth.is_none() {
                p.add(
                    "stats.listen",
                    format!(
                        "{} is not a loopback address; exposing HAProxy's stats and /metrics off \
                         the node requires stats.auth",
                        stats.listen
                    ),
                );
            }
            if stats.listen.0 == self.listen.0 {
                p.add("stats.listen", "is the same address as listen");
            }
        }
        if self.metrics.listen.0 == self.listen.0 {
            p.add("metrics.listen", "is the same address as listen");
        }
        for (field, addr, exposed, why) in [
            (
                "listen",
                self.listen.0,
                Exposed::Listen,
                "other hosts could reach the API servers through this node, with their own credentials",
            ),
            (
                "metrics.listen",
                self.metrics.listen.0,
                Exposed::Metrics,
                "other hosts could read the masters' addresses and states",
            ),
        ] {
            if !addr.ip().is_loopback() && !self.expose.contains(&exposed) {
                p.add(
                    field,
                    format!(
                        "{addr} is not a loopback address: {why}. If that is intended, say so with \
                         `expose: [{}]`",
                        exposed.as_str()
                    ),
                );
            }
        }
    }

    /// The directories are absolute, and short enough for unix sockets.
    fn validate_dirs(&self, p: &mut Problems) {
        for (field, dir) in [
            ("haproxy.runtime_dir", &self.haproxy.runtime_dir),
            ("haproxy.state_dir", &self.haproxy.state_dir),
        ] {
            if !dir.is_absolute() {
                p.add(field, format!("{} must be an absolute path", dir.display()));
            }
        }
        let longest =
            self.haproxy.runtime_dir.as_os_str().len() + crate::layout::Paths::longest_socket_name_len();
        if longest > MAX_UNIX_SOCKET_PATH {
            p.add(
                "haproxy.runtime_dir",
                format!(
                    "{} is too long: unix socket paths inside it would exceed {MAX_UNIX_SOCKET_PATH} bytes",
                    self.haproxy.runtime_dir.display()
                ),
            );
        }
    }

    /// Paths and names that haproxy.cfg holds: it holds these paths as
    /// bare words, and names and paths in its comments: a line break would
    /// end the line, and a blank, '#', a quote or '\' would cut or change
    /// the word.
    fn validate_text(&self, p: &mut Problems) {
        let (words, lines) = self.text_in_haproxy_cfg();
        for (field, s) in words {
            // ';' separates commands on HAProxy's runtime API, which
            // `add server` passes these paths to.
            let bad = |c: &char| {
                c.is_control() || c.is_ascii_whitespace() || matches!(c, '#' | '"' | '\'' | '\\' | ';')
            };
            if let Some(c) = s.chars().find(bad) {
                p.add(
                    field,
                    format!(
                        "{s:?} contains {c:?}; haproxy.cfg and HAProxy's runtime API cannot take a path with \
                         blanks, control characters, '#', quotes, '\\' or ';'"
                    ),
                );
            }
        }
        for (field, s) in lines {
            if let Some(c) = s.chars().find(|c| c.is_control()) {
                p.add(field, format!("{s:?} contains the control character {c:?}"));
            }
        }
    }

    /// The settings haproxy.cfg holds as bare words (paths), and those it
    /// only names in comments, by field.
    fn text_in_haproxy_cfg(&self) -> (Vec<FieldText>, Vec<FieldText>) {
        let text = |p: &Path| p.to_string_lossy().into_owned();
        let mut words = vec![
            ("haproxy.runtime_dir".to_owned(), text(&self.haproxy.runtime_dir)),
            ("haproxy.state_dir".to_owned(), text(&self.haproxy.state_dir)),
        ];
        let mut lines = Vec::new();
        let auth = &self.health.auth;
        if let Some(ca) = &self.health.tls.ca_file {
            words.push(("health.tls.ca_file".to_owned(), text(ca)));
        }
        if let Some(p) = &auth.token_file {
            lines.push(("health.auth.token_file".to_owned(), text(p)));
        }
        if let Some(p) = &auth.cert_file {
            lines.push(("health.auth.cert_file".to_owned(), text(p)));
        }
        for (i, wk) in auth.well_known.iter().enumerate() {
            lines.push((format!("health.auth.well_known[{i}].name"), wk.name.clone()));
            lines.push((format!("health.auth.well_known[{i}].cert_file"), text(&wk.cert_file)));
            if let Some(ca) = &wk.ca_file {
                words.push((format!("health.auth.well_known[{i}].ca_file"), text(ca)));
            }
        }
        (words, lines)
    }
}

/// Deserializes a string through `parse` *inside* serde_yaml's own
/// `deserialize_str`, so a refusal carries the field's path and line.
fn de_str<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: fn(&str) -> Result<T, String>,
    expecting: &'static str,
) -> Result<T, D::Error> {
    struct StrVisitor<T> {
        parse: fn(&str) -> Result<T, String>,
        expecting: &'static str,
    }
    impl<T> Visitor<'_> for StrVisitor<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.parse)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(StrVisitor { parse, expecting })
}

/// An `IP:port` a listener binds. Names are refused: a bind needs an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct Listen(pub SocketAddr);

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Listen> for String {
    fn from(l: Listen) -> String {
        l.to_string()
    }
}

impl FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse::<SocketAddr>().map(Listen).map_err(|_| {
            format!("\"{s}\" is not an IP:port to listen on (e.g. 127.0.0.1:16443 or [::1]:16443)")
        })
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, str::parse, "an IP:port")
    }
}

/// The host part of a master's address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A literal IPv4 or IPv6 address.
    Ip(IpAddr),
    /// A DNS name, resolved by HAProxy at start and re-resolved at run time.
    Dns(String),
}

/// A master's `host:port`; IPv6 in brackets, names are DNS names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    /// Where the API server is.
    pub host: Host,
    /// Its TLS port, usually 6443.
    pub port: u16,
}

impl Address {
    /// Identity used to detect duplicates: DNS names compare case-insensitively.
    fn key(&self) -> String {
        self.to_string().to_ascii_lowercase()
    }

    /// True when HAProxy must resolve the host through DNS.
    pub fn is_dns(&self) -> bool {
        matches!(self.host, Host::Dns(_))
    }

    /// The host as written without brackets (for SNI, names, logs).
    pub fn host_str(&self) -> String {
        match &self.host {
            Host::Ip(ip) => ip.to_string(),
            Host::Dns(n) => n.clone(),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Dns(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

impl Serialize for Address {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad_port = |p: &str| format!("\"{s}\" has an invalid port \"{p}\" (expected 1-65535)");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("\"{s}\" has an unclosed '[' around its IPv6 address"))?;
            let ip: Ipv6Addr =
                ip.parse().map_err(|_| format!("\"{s}\": \"{ip}\" is not a valid IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p,
                None if after.is_empty() => {
                    return Err(format!("\"{s}\" has no port (expected [{ip}]:6443)"));
                }
                None => return Err(format!("\"{s}\" has junk after ']'")),
            };
            (Host::Ip(IpAddr::V6(ip)), port)
        } else {
            if s.matches(':').count() > 1 {
                return Err(format!(
                    "\"{s}\" looks like an IPv6 address; write it in brackets with a port, \
                     e.g. [fd00::1]:6443"
                ));
            }
            let (host, port) = s
                .split_once(':')
                .ok_or_else(|| format!("\"{s}\" has no port (expected host:port, e.g. {s}:6443)"))?;
            if host.is_empty() {
                return Err(format!("\"{s}\" has no host"));
            }
            (parse_host(host).map_err(|e| format!("\"{s}\": {e}"))?, port)
        };
        let port = port.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad_port(port))?;
        Ok(Address { host, port })
    }
}

fn parse_host(host: &str) -> Result<Host, String> {
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(ip)));
    }
    if host.len() > 253 {
        return Err("the DNS name is longer than 253 characters".into());
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let labels: Vec<&str> = name.split('.').collect();
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "\"{host}\" is not an IPv4 address, a bracketed IPv6 address or a valid DNS name"
            ));
        }
    }
    if labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!("\"{host}\" is not a valid IPv4 address"));
    }
    Ok(Host::Dns(host.to_owned()))
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_str(d, str::parse, "host:port")
    }
}

/// One API server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Master {
    /// The name used for the HAProxy server, in logs, metrics and status.
    /// Derived from the address when not given.
    pub name: String,
    /// Where it listens.
    pub address: Address,
}

/// A master's name: what HAProxy accepts in a server name, minus `:`, which
/// apilb reserves for the fail-open twins (`<name>:fallback`).
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("name \"{name}\" must be 1 to 63 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(format!("name \"{name}\" may only contain letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

/// A master entry before names are defaulted.
struct MasterSpec {
    name: Option<String>,
    address: Address,
}

impl<'de> Deserialize<'de> for MasterSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SpecVisitor;

        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Map {
            #[serde(default, deserialize_with = "deserialize_name")]
            name: Option<String>,
            address: Address,
        }

        fn deserialize_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
            let parse = |n: &str| validate_name(n).map(|()| Some(n.to_owned()));
            de_str(d, parse, "a server name")
        }

        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = MasterSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"host:port\" or a map {name, address}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MasterSpec, E> {
                Ok(MasterSpec { name: None, address: v.parse().map_err(E::custom)? })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<MasterSpec, A::Error> {
                let m = Map::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(MasterSpec { name: m.name, address: m.address })
            }
        }
        d.deserialize_any(SpecVisitor)
    }
}

/// Deserializes the master list and gives unnamed masters a name derived
/// from their host (and port, when two masters share a host).
fn deserialize_masters<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Master>, D::Error> {
    let specs = Vec::<MasterSpec>::deserialize(d)?;
    let mut host_count: HashMap<String, usize> = HashMap::new();
    for s in specs.iter().filter(|s| s.name.is_none()) {
        *host_count.entry(s.address.host_str().to_ascii_lowercase()).or_default() += 1;
    }
    Ok(specs
        .into_iter()
        .map(|s| {
            let name = s.name.unwrap_or_else(|| {
                let host = s.address.host_str();
                let base = derive_name(&host);
                if host_count.get(&host.to_ascii_lowercase()).copied().unwrap_or(0) > 1 {
                    format!("{base}-{}", s.address.port)
                } else {
                    base
                }
            });
            Master { name, address: s.address }
        })
        .collect())
}

/// Makes a server name out of a host: IPv6 colons become dashes.
pub fn derive_name(host: &str) -> String {
    host.chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .collect()
}

/// HAProxy's balancing algorithm for new connections.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// New connections go to the master with the fewest; suits long-lived
    /// watches, which make round-robin counts meaningless.
    #[default]
    Leastconn,
    /// Strict rotation.
    Roundrobin,
    /// Random choice (power of two choices in HAProxy).
    Random,
    /// Hash of the client address: a node sticks to one master.
    Source,
}

impl Balance {
    /// The keyword HAProxy expects after `balance`.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Leastconn => "leastconn",
            Balance::Roundrobin => "roundrobin",
            Balance::Random => "random",
            Balance::Source => "source",
        }
    }
}

/// The active health check HAProxy runs against every master.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// The HTTP path checked. `/readyz` fails while the API server is
    /// starting, shutting down or has lost etcd, unlike `/livez`.
    pub path: HttpPath,
    /// Time between two checks of one master.
    pub interval: Duration,
    /// How long one check may take once connected (`timeout check`).
    pub timeout: Duration,
    /// Consecutive successes before a master is put back in rotation.
    pub rise: u32,
    /// Consecutive failures before a master is taken out of rotation.
    pub fall: u32,
    /// HTTP statuses that count as healthy.
    #[serde(deserialize_with = "deserialize_statuses")]
    pub expect_status: Vec<u16>,
    /// How the check's TLS handshake is verified.
    pub tls: HealthTls,
    /// Which credential the check presents.
    pub auth: HealthAuth,
    /// Who decides a master's health: HAProxy's own TLS check (a new
    /// handshake per check), or apilb's persistent checker (one kept-alive
    /// connection per master, a request per check: a quarter to a half of
    /// the API server's CPU; docs/health-checks.md, "Fleet scale").
    pub checker: Checker,
    /// With `checker: persistent`, how often HAProxy's own check still
    /// runs, as a backstop that takes failing masters out (and brings them
    /// back) while the agent is down. Its handshakes are what the fleet
    /// still pays: every 30s adds a thirtieth of a per-second check.
    pub backstop_interval: Duration,
}

/// Who decides a master's health (`health.checker`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Checker {
    /// HAProxy's check: a new TLS connection per check, every `interval`.
    #[default]
    Haproxy,
    /// apilb's checker on a kept-alive connection per master, its verdict
    /// pushed to HAProxy through the runtime API; HAProxy's check runs
    /// every `backstop_interval` as a backstop.
    Persistent,
}

impl Checker {
    /// As written in apilb.yaml.
    pub fn as_str(self) -> &'static str {
        match self {
            Checker::Haproxy => "haproxy",
            Checker::Persistent => "persistent",
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            path: HttpPath("/readyz".into()),
            interval: Duration::from_millis(1000),
            timeout: Duration::from_millis(1000),
            rise: 2,
            fall: 2,
            expect_status: vec![200],
            tls: HealthTls::default(),
            auth: HealthAuth::default(),
            checker: Checker::Haproxy,
            backstop_interval: Duration::from_millis(30_000),
        }
    }
}

fn deserialize_statuses<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    /// One status code, checked inside serde_yaml's call (for the line).
    struct Status(u16);
    impl<'de> Deserialize<'de> for Status {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Status;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("an HTTP status code")
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Status, E> {
                    u16::try_from(v)
                        .ok()
                        .filter(|c| (100..=599).contains(c))
                        .map(Status)
                        .ok_or_else(|| E::custom(format!("{v} is not an HTTP status code (100-599)")))
                }
            }
            d.deserialize_u64(V)
        }
    }
    Ok(Vec::<Status>::deserialize(d)?.into_iter().map(|s| s.0).collect())
}

/// The path of the check request: absolute, printable, no spaces.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HttpPath(pub String);

impl<'de> Deserialize<'de> for HttpPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn parse(s: &str) -> Result<HttpPath, String> {
            if !s.starts_with('/') {
                return Err(format!("\"{s}\" must start with '/'"));
            }
            // A URL path and query, and nothing haproxy.cfg or HAProxy's
            // runtime API reads as syntax (quotes, '\\', '#', ';').
            if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._~%!$&()*+,=:@?-".contains(&b)) {
                return Err(format!(
                    "\"{s}\" may only contain letters, digits and /._~%!$&()*+,=:@?- (no spaces, quotes, \
                     '\\', '#' or ';')"
                ));
            }
            Ok(HttpPath(s.to_owned()))
        }
        de_str(d, parse, "an absolute HTTP path")
    }
}

impl fmt::Display for HttpPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// TLS verification of the check.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthTls {
    /// CA bundle that signed the API servers' serving certificates.
    pub ca_file: Option<PathBuf>,
    /// Name sent as SNI and matched against the certificate's SANs. Every
    /// kubeadm, k3s and RKE2 API server certificate carries `kubernetes`.
    #[serde(deserialize_with = "deserialize_server_name")]
    pub server_name: Option<String>,
    /// Skip certificate verification. Must be set explicitly; the check then
    /// proves only that *something* speaks TLS and HTTP on the port.
    pub insecure_skip_verify: bool,
}

/// SNI name used when `health.tls.server_name` is not set.
pub const DEFAULT_SERVER_NAME: &str = "kubernetes";

impl HealthTls {
    /// The name used for SNI, the Host header and certificate verification.
    pub fn server_name(&self) -> &str {
        self.server_name.as_deref().unwrap_or(DEFAULT_SERVER_NAME)
    }
}

fn deserialize_server_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    fn parse(s: &str) -> Result<Option<String>, String> {
        match parse_host(s) {
            Ok(Host::Dns(_)) => Ok(Some(s.to_owned())),
            _ => Err(format!(
                "\"{s}\" must be a DNS name from the API server certificate's SANs, such as \
                 kubernetes (SNI cannot carry an IP address)"
            )),
        }
    }
    de_str(d, parse, "a DNS name")
}

/// Which credential the check presents.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// No credential: the API servers must allow anonymous `/readyz`.
    None,
    /// `Authorization: Bearer <token>` from `token_file`.
    Bearer,
    /// A client certificate from `cert_file` and `key_file`.
    ClientCert,
    /// The first credential found: the configured files, then the
    /// well-known paths of k3s, RKE2 and kubeadm nodes.
    #[default]
    Auto,
}

impl AuthMode {
    /// The mode's name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Bearer => "bearer",
            AuthMode::ClientCert => "client_cert",
            AuthMode::Auto => "auto",
        }
    }
}

/// Credentials of the check.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthAuth {
    /// Which credential to use.
    pub mode: AuthMode,
    /// File holding a bearer token (one line).
    pub token_file: Option<PathBuf>,
    /// Client certificate (PEM). May also hold the key, as kubeadm's
    /// `kubelet-client-current.pem` does.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), when not inside `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Where `auto` looks after the configured files, in order.
    pub well_known: Vec<WellKnownCredential>,
}

impl Default for HealthAuth {
    fn default() -> Self {
        HealthAuth {
            mode: AuthMode::Auto,
            token_file: None,
            cert_file: None,
            key_file: None,
            well_known: default_well_known(),
        }
    }
}

/// A place where a node keeps a client credential and the cluster CA.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WellKnownCredential {
    /// Shown in logs and status, e.g. `k3s-agent`.
    pub name: String,
    /// Client certificate (PEM).
    pub cert_file: PathBuf,
    /// Client key (PEM); absent when the cert file holds both.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The cluster CA that goes with it.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// k3s agent, RKE2 agent and kubeadm kubelet credentials.
pub fn default_well_known() -> Vec<WellKnownCredential> {
    let rancher = |dist: &str| WellKnownCredential {
        name: format!("{dist}-agent"),
        cert_file: format!("/var/lib/rancher/{dist}/agent/client-kubelet.crt").into(),
        key_file: Some(format!("/var/lib/rancher/{dist}/agent/client-kubelet.key").into()),
        ca_file: Some(format!("/var/lib/rancher/{dist}/agent/server-ca.crt").into()),
    };
    vec![
        rancher("k3s"),
        rancher("rke2"),
        WellKnownCredential {
            name: "kubeadm-kubelet".into(),
            cert_file: "/var/lib/kubelet/pki/kubelet-client-current.pem".into(),
            key_file: None,
            ca_file: Some("/etc/kubernetes/pki/ca.crt".into()),
        },
    ]
}

/// HAProxy's timeouts.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Time allowed to establish a TCP connection to a master. Short enough
    /// that a connection to a black-holed master is retried on another one
    /// quickly; long enough for one lost SYN (retransmitted after 1s).
    pub connect: Duration,
    /// Inactivity allowed on the client side.
    pub client: Duration,
    /// Inactivity allowed on the server side.
    pub server: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        // Watches and `kubectl logs -f` can stay silent for minutes. Cutting
        // them forces re-lists on the API servers, so idle timeouts are long;
        // dead masters are handled by checks closing their sessions, not by
        // idle timeouts.
        Timeouts {
            connect: Duration::from_millis(3_000),
            client: Duration::from_millis(30 * 60_000),
            server: Duration::from_millis(30 * 60_000),
        }
    }
}

impl Timeouts {
    /// Idle time after which an established connection is closed (HAProxy's
    /// `timeout tunnel`, which applies to traffic in either direction).
    pub fn tunnel(&self) -> Duration {
        self.client.max(self.server)
    }
}

/// HAProxy's stats page and Prometheus exporter.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Address of the listener. Loopback unless `auth` is set.
    #[serde(default = "default_stats_listen")]
    pub listen: Listen,
    /// Basic auth for the page and `/metrics`.
    #[serde(default)]
    pub auth: Option<StatsAuth>,
}

fn default_stats_listen() -> Listen {
    Listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 8404)))
}

/// Basic-auth credentials for the stats listener.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StatsAuth {
    /// The user name.
    #[serde(deserialize_with = "deserialize_user")]
    pub user: String,
    /// File holding the password, so it never sits in the YAML.
    pub password_file: PathBuf,
}

fn deserialize_user<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    fn parse(s: &str) -> Result<String, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            return Err(format!("\"{s}\" may only contain letters, digits, '-', '_' and '.'"));
        }
        Ok(s.to_owned())
    }
    de_str(d, parse, "a user name")
}

/// apilb's own HTTP endpoint.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Address of /metrics, /healthz, /readyz and /status.
    pub listen: Listen,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics { listen: Listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 9716))) }
    }
}

/// HAProxy binary, directories and process-wide settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HaproxySettings {
    /// The executable; a bare name is looked up on PATH.
    pub binary: PathBuf,
    /// Rendered config, sockets and pidfile. Must survive agent restarts
    /// (systemd `RuntimeDirectoryPreserve=yes`) so a new agent can adopt.
    pub runtime_dir: PathBuf,
    /// Server state and the last applied master set, kept across reboots.
    pub state_dir: PathBuf,
    /// How long old workers may keep connections after a reload before
    /// they are closed; bounds how many old processes can pile up.
    pub hard_stop_after: Duration,
    /// Maximum concurrent connections per HAProxy process.
    pub maxconn: u32,
    /// The user HAProxy's workers run as, once they have loaded the config
    /// and the check's credential, when apilb runs as root (the master
    /// stays root to reload them; under apilb.service nothing is root and
    /// this is not used). A worker holds every connection of the node: as
    /// root, a flaw in it would reach the node's credentials. Empty:
    /// workers stay root.
    #[serde(deserialize_with = "deserialize_run_as")]
    pub user: String,
}

impl Default for HaproxySettings {
    fn default() -> Self {
        HaproxySettings {
            binary: "haproxy".into(),
            runtime_dir: "/run/apilb".into(),
            state_dir: "/var/lib/apilb".into(),
            hard_stop_after: Duration::from_millis(5 * 60_000),
            maxconn: 4096,
            user: "haproxy".into(),
        }
    }
}

/// A user name for haproxy.cfg's `user`, or empty.
fn deserialize_run_as<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    fn parse(s: &str) -> Result<String, String> {
        let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_');
        let valid = s.bytes().all(ok) && !s.starts_with('-');
        if !valid {
            return Err(format!(
                "\"{s}\" is not a user name (lowercase letters, digits, '-' and '_'); \"\" keeps the workers as root"
            ));
        }
        Ok(s.to_owned())
    }
    de_str(d, parse, "a user name")
}

/// A duration written with a unit: `500ms`, `2s`, `30m`, `1h`, `1m30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(u64);

impl Duration {
    /// A duration of `ms` milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Duration(ms)
    }
    /// Its length in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.0
    }
    /// As a std duration.
    pub const fn std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("\"{s}\" is not a duration; write a number and a unit, e.g. 500ms, 2s, 30m or 1h");
        if s.is_empty() {
            return Err(bad());
        }
        let mut total: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let factor = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" if unit_len == rest.len() => {
                    return Err(format!("\"{s}\" needs a unit, e.g. {n}s or {n}ms"));
                }
                _ => return Err(bad()),
            };
            rest = &rest[unit_len..];
            total = n
                .checked_mul(factor)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(|| format!("\"{s}\" is too long"))?;
        }
        // HAProxy's timers are signed 32-bit milliseconds (about 24 days).
        if total > i32::MAX as u64 {
            return Err(format!("\"{s}\" is too long (the maximum is 24 days)"));
        }
        Ok(Duration(total))
    }
}

/// Prints the largest unit that represents the duration exactly; this is
/// also the form written into haproxy.cfg.
impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0;
        if ms != 0 && ms.is_multiple_of(3_600_000) {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms != 0 && ms.is_multiple_of(60_000) {
            write!(f, "{}m", ms / 60_000)
        } else if ms != 0 && ms.is_multiple_of(1_000) {
            write!(f, "{}s", ms / 1_000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct DurVisitor;
        impl Visitor<'_> for DurVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 2s or 30m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(format!("{v} needs a unit, e.g. {v}s or {v}ms")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(format!("{v} is not a duration; write e.g. 2s or 500ms")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(format!("{v} is not a duration; write e.g. 1500ms instead of 1.5s")))
            }
        }
        d.deserialize_any(DurVisitor)
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

pub mod restart_only;

#[cfg(test)]
mod tests;
