//! Turns a [`Config`] and its [`Inputs`] into haproxy.cfg.
//!
//! Rendering is pure: no I/O, no clock, no randomness, so the same input
//! always gives byte-identical output and the same [`Rendered::hash`]. The
//! hash is what the agent compares to decide whether a reload is needed and
//! what `apilb_config_info` exports.
//!
//! The server parameters of a master come from [`server_params`] alone, so
//! the template and any runtime `add server` use exactly the same check.

use std::fmt::Write as _;
use std::path::PathBuf;

use askama::Template;

use crate::config::{Balance, Checker, Config, Master};
use crate::digest::sha256_hex;
use crate::inputs::{Credential, Inputs, Secret, Verify};
use crate::layout::Paths;

/// Name of the HAProxy backend holding the masters.
pub const BACKEND: &str = "masters";
/// Name of the HAProxy frontend on `listen`.
pub const FRONTEND: &str = "apiserver";
/// Suffix of each master's unchecked fail-open twin. `:` cannot appear in a
/// master's own name, so the two never collide.
pub const FALLBACK_SUFFIX: &str = ":fallback";

/// What the HAProxy that will run a config handles correctly, where the
/// config depends on it ([`crate::haproxy::Version::features`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// `on-marked-down shutdown-sessions` closes a failed master's sessions
    /// as it should. Not on HAProxy 3.0: there the forced shutdown can
    /// freeze a connection still being set up to that master (never
    /// answered, never closed, no timeout applies; docs/health-checks.md).
    /// When false the server lines omit it and the agent closes the
    /// established sessions of a master marked DOWN itself.
    pub shutdown_sessions_on_mark_down: bool,
}

impl Default for Features {
    /// What HAProxy 2.6, the oldest version supported, handles.
    fn default() -> Self {
        Features { shutdown_sessions_on_mark_down: true }
    }
}

/// A file the rendered config refers to and that must be written (0600)
/// before HAProxy reads the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuxFile {
    /// Where it goes.
    pub path: PathBuf,
    /// Its content (a client bundle has a key inside, so it is a secret;
    /// a CA copy is not, but is kept the same way).
    pub contents: Secret,
}

/// The output of a render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// The complete haproxy.cfg, secrets included.
    pub text: Secret,
    /// SHA-256 of the text with its secrets redacted, hex: what status,
    /// metrics, logs and `apilb check` show. Equal for renders that differ
    /// only in a secret.
    pub hash: String,
    /// SHA-256 of the complete text, hex: tells any change, a rotated
    /// token included. Never shown (it would test guesses of the secrets);
    /// kept in memory and in the runtime directory's private marker file.
    pub fingerprint: String,
    /// Files that must exist next to it.
    pub aux_files: Vec<AuxFile>,
    /// Removes this config's secrets from any text.
    pub redactor: Redactor,
    /// The HAProxy features it was rendered for.
    pub features: Features,
}

/// Removes known secret values from text (HAProxy's messages, logs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redactor {
    /// Secret values, longest first.
    secrets: Vec<Secret>,
}

impl Redactor {
    /// Replaces every secret in `text` with `<redacted>`. HAProxy cuts long
    /// lines it echoes in error messages, so a secret may appear truncated:
    /// any run of its first 6 or more characters is redacted too.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            let s = s.expose();
            out = out.replace(s, "<redacted>");
            let chars: Vec<char> = s.chars().collect();
            for len in (6..chars.len()).rev() {
                let prefix: String = chars[..len].iter().collect();
                if out.contains(&prefix) {
                    out = out.replace(&prefix, "<redacted>");
                }
            }
        }
        out
    }
}

impl Rendered {
    /// The first 12 hex digits of the hash, for humans.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    /// The config with every secret replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        self.redact(self.text.expose())
    }

    /// Removes this config's secrets from any text (e.g. HAProxy's output).
    pub fn redact(&self, text: &str) -> String {
        self.redactor.redact(text)
    }
}

/// What the check sends and how it verifies, shared by every server line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckPlan {
    /// `ca-file …` / `verify none` and `check-sni`.
    tls: String,
    /// ` crt …` when a client certificate is used.
    crt: String,
    /// `inter … rise … fall …`.
    timing: String,
    /// What happens to a master's sessions when it is marked down.
    on_marked_down: &'static str,
}

impl CheckPlan {
    /// The check settings of `config` with the files of `inputs`, laid out
    /// as in `paths`, for an HAProxy with `features`.
    pub fn new(config: &Config, inputs: &Inputs, paths: &Paths, features: Features) -> Self {
        let sni = config.health.tls.server_name();
        let tls = match &inputs.check.verify {
            // The certificate name is verified against check-sni (measured
            // on 2.6, 3.0 and 3.2: verifyhost is then ignored by checks).
            // verifyhost names it too, so verification never depends on
            // which SNI a version picks (3.3 chooses one by itself when
            // none is set).
            Verify::Ca { digest, .. } => {
                let ca = paths.check_ca(digest);
                format!("verify required ca-file {} check-sni {sni} verifyhost {sni}", ca.display())
            }
            Verify::Insecure | Verify::BootstrapNoCa => format!("verify none check-sni {sni}"),
        };
        let crt = match &inputs.check.credential {
            Credential::ClientCert { digest, .. } => {
                format!(" crt {}", paths.client_bundle(digest).display())
            }
            _ => String::new(),
        };
        let h = &config.health;
        let timing = format!(
            "inter {} fastinter {} rise {} fall {}",
            h.interval,
            fastinter(h.interval),
            h.rise,
            h.fall
        );
        let on_marked_down =
            if haproxy_closes_sessions(config, features) { " on-marked-down shutdown-sessions" } else { "" };
        let plan = CheckPlan { tls, crt, timing, on_marked_down };
        match h.checker {
            Checker::Haproxy => plan,
            // At least two failed backstop checks: with the agent alive, a
            // single failed handshake would otherwise keep a master the
            // checker holds UP out for a whole backstop interval or two.
            Checker::Persistent => plan.with_backstop(h.backstop_interval, h.rise, h.fall.max(2)),
        }
    }
}

/// True when HAProxy's own `on-marked-down shutdown-sessions` closes a
/// failed master's established sessions; otherwise the agent does it:
/// - on HAProxy 3.0, where that shutdown can freeze connections
///   ([`Features::shutdown_sessions_on_mark_down`]);
/// - with the persistent checker, whose mark-down of a crashed master comes
///   milliseconds after the crash, while HAProxy may still be redispatching
///   a connection to it (the shutdown would cut that one); the agent closes
///   the sessions of a master that answers badly or hangs, and leaves a
///   crashed one's (already dead) alone.
pub fn haproxy_closes_sessions(config: &Config, features: Features) -> bool {
    features.shutdown_sessions_on_mark_down && config.health.checker == Checker::Haproxy
}

impl CheckPlan {
    /// The same check as a slow **backstop** (issue 15): apilb's
    /// persistent checker ([`crate::check`]) decides and pushes its verdict
    /// with `set server … health`, and HAProxy's own check runs every
    /// `interval` (also while a master is down) to take a failing master
    /// out and bring it back when no agent is left to do it
    /// (tests/verdict_path.rs). `fastinter` stays short (1s, or the
    /// interval if shorter) so a backstop transition is confirmed quickly.
    /// Rendered with `health.checker: persistent`.
    pub fn with_backstop(mut self, interval: crate::config::Duration, rise: u32, fall: u32) -> Self {
        let fast = crate::config::Duration::from_millis(interval.as_millis().min(1000));
        self.timing =
            format!("inter {interval} fastinter {fast} downinter {interval} rise {rise} fall {fall}");
        self
    }
}

/// The parameters of a master's checked `server` line (everything after the
/// address). The runtime API's `add server` must use exactly this.
pub fn server_params(plan: &CheckPlan, master: &Master) -> String {
    let mut p = format!(
        "check check-ssl {}{} {}{} on-marked-up shutdown-backup-sessions observe layer4 error-limit 10 \
         on-error fastinter",
        plan.tls, plan.crt, plan.timing, plan.on_marked_down
    );
    p.push_str(&dns_params(master));
    p
}

/// The parameters of a master's fail-open twin: a backup without checks.
pub fn fallback_params(master: &Master) -> String {
    format!("backup{}", dns_params(master))
}

/// True when the config needs the `resolvers` section: some master is
/// given by DNS name.
pub fn needs_resolvers(masters: &[Master]) -> bool {
    masters.iter().any(|m| m.address.is_dns())
}

fn dns_params(master: &Master) -> String {
    if master.address.is_dns() {
        // A name that does not resolve at start (DNS down at boot) leaves
        // the server without an address instead of failing the start; the
        // resolvers section fills it in later.
        " resolvers sys init-addr last,libc,none".to_owned()
    } else {
        String::new()
    }
}

/// One `server` line.
struct ServerLine {
    name: String,
    address: String,
    params: String,
}

/// The stats/exporter listener.
struct StatsSection {
    listen: String,
    user: Option<(String, String)>,
}

#[derive(Template)]
#[template(path = "haproxy.cfg", escape = "none")]
struct HaproxyCfg {
    notes: Vec<String>,
    stats_socket: String,
    server_state_file: String,
    hard_stop_after: String,
    maxconn: u32,
    connect: String,
    client: String,
    server: String,
    tunnel: String,
    check_timeout: String,
    listen: String,
    frontend: &'static str,
    backend: &'static str,
    balance: &'static str,
    hash_consistent: bool,
    retries: usize,
    check_send: String,
    check_expect: String,
    servers: Vec<ServerLine>,
    resolvers: bool,
    stats: Option<StatsSection>,
    run_as: Option<crate::inputs::RunAs>,
}

/// Quotes a value for haproxy.cfg: single quotes keep everything literal
/// (no escapes, no `$VAR` expansion); a `'` inside is written `'\''`, which
/// HAProxy joins back into one word. Verified for all printable ASCII.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Quotes a value that HAProxy reads as a log-format string (the values of
/// `http-check send hdr`), where `%` introduces a variable.
pub fn quote_log_format(s: &str) -> String {
    quote(&s.replace('%', "%%"))
}

/// Renders haproxy.cfg for `config`, with files laid out as in `paths`, for
/// an HAProxy with `features`.
pub fn render(config: &Config, inputs: &Inputs, paths: &Paths, features: Features) -> Rendered {
    let plan = CheckPlan::new(config, inputs, paths, features);
    let CheckParts { notes, aux_files, check_send, mut secrets } = check_parts(config, inputs, paths);
    let check_expect = check_expect(&inputs.check.accepted_statuses(&config.health.expect_status));
    let stats = stats_section(config, inputs, &mut secrets);
    let t = &config.timeouts;
    let cfg = HaproxyCfg {
        notes,
        stats_socket: paths.stats_socket().display().to_string(),
        server_state_file: paths.server_state_file().display().to_string(),
        hard_stop_after: config.haproxy.hard_stop_after.to_string(),
        maxconn: config.haproxy.maxconn,
        connect: t.connect.to_string(),
        client: t.client.to_string(),
        server: t.server.to_string(),
        tunnel: t.tunnel().to_string(),
        check_timeout: config.health.timeout.to_string(),
        listen: config.listen.to_string(),
        frontend: FRONTEND,
        backend: BACKEND,
        balance: config.balance.as_str(),
        hash_consistent: config.balance == Balance::Source,
        // Constant, so the master set can change at run time without any
        // line but the server lines changing.
        retries: 3,
        check_send,
        check_expect,
        servers: server_lines(config, &plan),
        resolvers: needs_resolvers(&config.masters),
        stats,
        run_as: inputs.run_as.clone(),
    };
    // The template only interpolates strings; it cannot fail at run time.
    let text = cfg.render().unwrap_or_else(|e| format!("# template error: {e}\n"));
    seal(text, secrets, aux_files, features)
}

/// The rendered text with its hashes and the redactor of its secrets.
fn seal(mut text: String, mut secrets: Vec<String>, aux_files: Vec<AuxFile>, features: Features) -> Rendered {
    // HAProxy refuses a file whose last line has no newline; askama trims it.
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let fingerprint = sha256_hex(text.as_bytes());
    // Longest first, so a secret containing another is redacted whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    let redactor = Redactor { secrets: secrets.into_iter().map(Secret::new).collect() };
    // What is shown: a hash over the text without its secrets, so that it
    // cannot be used to test guesses of a token or a password offline.
    let hash = sha256_hex(redactor.redact(&text).as_bytes());
    Rendered { text: Secret::new(text), hash, fingerprint, aux_files, redactor, features }
}

/// What the check sends and the files and notes that come with it.
struct CheckParts {
    /// The comments on top of haproxy.cfg: credential, CA, bundle.
    notes: Vec<String>,
    /// The CA copy and the client bundle HAProxy reads.
    aux_files: Vec<AuxFile>,
    /// `http-check send`'s arguments (the bearer token included).
    check_send: String,
    /// Every form of the token the text holds, for the redactor.
    secrets: Vec<String>,
}

/// The check's request, notes, files and secrets for `inputs`.
fn check_parts(config: &Config, inputs: &Inputs, paths: &Paths) -> CheckParts {
    let mut secrets = Vec::new();
    let mut aux_files = Vec::new();

    let mut notes =
        vec![format!("check credential: {} ({})", inputs.check.mode_in_use(), inputs.check.source)];
    match &inputs.check.verify {
        Verify::Ca { path, digest, pem } => {
            aux_files.push(AuxFile { path: paths.check_ca(digest), contents: Secret::new(pem.clone()) });
            notes.push(format!("check CA: {} sha256:{digest}", path.display()));
        }
        Verify::Insecure => notes.push("check CA: none, verification disabled by config".into()),
        Verify::BootstrapNoCa => {
            notes.push("check CA: none found yet (bootstrap), certificates not verified".into())
        }
    }

    let sni = config.health.tls.server_name();
    let mut check_send = format!("meth GET uri {} ver HTTP/1.1 hdr Host {sni}", config.health.path);
    match &inputs.check.credential {
        Credential::Bearer { token, .. } => {
            let value = quote_log_format(&format!("Bearer {}", token.expose()));
            let _ = write!(check_send, " hdr Authorization {value}");
            secrets.push(token.expose().to_owned());
            secrets.push(token.expose().replace('%', "%%"));
            // As written inside the quotes, where a `'` becomes `'\''`.
            secrets.push(token.expose().replace('%', "%%").replace('\'', "'\\''"));
        }
        Credential::ClientCert { bundle, digest, .. } => {
            aux_files.push(AuxFile { path: paths.client_bundle(digest), contents: bundle.clone() });
            notes.push(format!("check client certificate bundle sha256:{digest}"));
        }
        Credential::Anonymous => {}
    }
    CheckParts { notes, aux_files, check_send, secrets }
}

/// `http-check expect` for the statuses that count as alive.
fn check_expect(statuses: &[u16]) -> String {
    if statuses.len() == 1 {
        format!("status {}", statuses[0])
    } else {
        let alternatives: Vec<String> = statuses.iter().map(u16::to_string).collect();
        format!("rstatus ^({})$", alternatives.join("|"))
    }
}

/// Every master's checked server, then every fail-open twin.
fn server_lines(config: &Config, plan: &CheckPlan) -> Vec<ServerLine> {
    let mut servers = Vec::with_capacity(config.masters.len() * 2);
    for m in &config.masters {
        servers.push(ServerLine {
            name: m.name.clone(),
            address: m.address.to_string(),
            params: server_params(plan, m),
        });
    }
    for m in &config.masters {
        servers.push(ServerLine {
            name: format!("{}{FALLBACK_SUFFIX}", m.name),
            address: m.address.to_string(),
            params: fallback_params(m),
        });
    }
    servers
}

/// The stats listener, if configured; its password joins `secrets`.
fn stats_section(config: &Config, inputs: &Inputs, secrets: &mut Vec<String>) -> Option<StatsSection> {
    config.stats.as_ref().map(|s| StatsSection {
        listen: s.listen.to_string(),
        user: s.auth.as_ref().zip(inputs.stats_password.as_ref()).map(|(a, pw)| {
            let quoted = quote(pw.expose());
            secrets.push(pw.expose().to_owned());
            secrets.push(quoted.clone());
            (a.user.clone(), quoted)
        }),
    })
}

/// Check interval while a master is changing state (after one failed or
/// one passed check) or after real traffic saw errors: a quarter of the
/// interval, at least 100ms. A master that starts failing is confirmed
/// DOWN sooner, without checking healthy masters more often.
pub fn fastinter(interval: crate::config::Duration) -> crate::config::Duration {
    crate::config::Duration::from_millis((interval.as_millis() / 4).max(100))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::CheckAuth;

    /// Unverified bearer-token checks with `token` (from `/t`).
    fn bearer_inputs(token: &str) -> Inputs {
        Inputs {
            check: CheckAuth {
                verify: Verify::Insecure,
                credential: Credential::Bearer { token: Secret::new(token), path: "/t".into() },
                bootstrap: false,
                source: "token file /t".into(),
                notes: Vec::new(),
            },
            stats_password: None,
            run_as: None,
        }
    }

    /// Found by fuzzing (the `config` target's redaction check): a bearer
    /// token may hold `'` (read_token accepts it), which haproxy.cfg writes
    /// as `'\''`; everything after it survived redaction.
    #[test]
    fn a_token_with_a_quote_is_redacted_whole() {
        let yaml = "masters: [10.0.0.1:6443]\n\
                    health: {tls: {insecure_skip_verify: true}, auth: {mode: bearer, token_file: /t}}\n";
        let config = Config::parse(yaml, "test").unwrap_or_else(|e| panic!("{e}"));
        let inputs = bearer_inputs("abc%def'ghijklmnop");
        let rendered = render(&config, &inputs, &Paths::from_config(&config), Features::default());
        assert!(rendered.text.expose().contains("hdr Authorization 'Bearer abc%%def'\\''ghijklmnop'"));
        let redacted = rendered.redacted();
        assert!(redacted.contains("hdr Authorization 'Bearer <redacted>'"), "{redacted}");
        assert!(!redacted.contains("ghijklmnop"), "{redacted}");
    }

    #[test]
    fn a_backstop_plan_changes_only_the_timing() {
        let config = Config::parse(
            "masters: [10.0.0.1:6443]\nhealth: {tls: {insecure_skip_verify: true}, auth: {mode: none}}\n",
            "test",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let inputs = Inputs::gather(&config).unwrap_or_else(|e| panic!("{e}"));
        let paths = Paths::from_config(&config);
        let plan = CheckPlan::new(&config, &inputs, &paths, Features::default());
        let today = server_params(&plan, &config.masters[0]);
        let backstop = server_params(
            &plan.with_backstop(crate::config::Duration::from_millis(10_000), 2, 2),
            &config.masters[0],
        );
        assert!(today.contains("inter 1s fastinter 250ms rise 2 fall 2"), "{today}");
        assert_eq!(
            backstop,
            today.replace(
                "inter 1s fastinter 250ms rise 2 fall 2",
                "inter 10s fastinter 1s downinter 10s rise 2 fall 2"
            )
        );
        assert!(backstop.contains("on-marked-down shutdown-sessions"), "{backstop}");
    }

    /// The hash that status and metrics show cannot test a guessed token:
    /// it is the same for every token; the internal fingerprint is not.
    #[test]
    fn the_shown_hash_does_not_depend_on_secrets() {
        let yaml = "masters: [10.0.0.1:6443]\n\
                    health: {tls: {insecure_skip_verify: true}, auth: {mode: bearer, token_file: /t}}\n";
        let config = Config::parse(yaml, "test").unwrap_or_else(|e| panic!("{e}"));
        let with = |token: &str| {
            render(&config, &bearer_inputs(token), &Paths::from_config(&config), Features::default())
        };
        let (a, b) = (with("guess-one-123"), with("guess-two-456"));
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.fingerprint, b.fingerprint, "a rotated token must still be applied");
        let full = sha256_hex(a.text.expose().as_bytes());
        assert_eq!(a.fingerprint, full);
        assert_ne!(a.hash, full);
        assert_eq!(a.short_hash(), &a.hash[..12]);
        // Debug output (panics, traces) carries no secret either.
        assert!(!format!("{a:?}").contains("guess-one-123"), "{a:?}");
    }
}
