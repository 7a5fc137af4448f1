//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer).
//!
//! Each function takes the fuzzer's bytes and runs them through the code
//! that parses text apilb does not write itself, then checks properties
//! the rest of apilb relies on. A panic is a finding. The fuzz targets are
//! one-liners calling these, and `tests/fuzz_corpus.rs` replays the
//! committed corpus and regressions through exactly the same code on the
//! stable toolchain. No function here touches the filesystem or the network.
//!
//! See docs/fuzzing.md.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use apilb::config::{Address, Cidr, Config, Master};
use apilb::discovery::{self, Api, kubeconfig, persist};
use apilb::haproxy::{self, output, stat};
use apilb::inputs::{Files, Inputs};
use apilb::layout::Paths;
use apilb::masters::Sources;
use apilb::render;

/// `apilb.yaml`: [`Config::parse`] on the bytes (when UTF-8) and, when the
/// config is accepted, what is pure downstream of it: `settings_hash`, and
/// a render with inputs modelled on what `inputs` would read (see
/// [`model_inputs`]). Checks that the render is deterministic, that every
/// master has exactly its two `server` lines and that no value from the
/// config can add a line, a word, a comment, a quote or a control
/// character to haproxy.cfg.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text, "fuzz") else { return };
    let hash = config.settings_hash();
    assert_eq!(hash.len(), 64, "settings_hash is not a SHA-256 hex digest");
    for d in [
        config.health.interval,
        config.health.timeout,
        config.timeouts.connect,
        config.timeouts.client,
        config.timeouts.server,
        config.haproxy.hard_stop_after,
    ] {
        // Durations are written into haproxy.cfg in their Display form.
        assert_eq!(d.to_string().parse::<apilb::config::Duration>().ok(), Some(d), "{d}");
    }
    for m in &config.masters {
        // The agent reads the server lines of a running haproxy.cfg back,
        // and the persisted set stores addresses as text.
        assert_eq!(m.address.to_string().parse::<Address>().as_ref(), Ok(&m.address), "{}", m.address);
    }

    let Some(inputs) = model_inputs(&config) else { return };
    let paths = Paths::from_config(&config);
    let rendered = render::render(&config, &inputs, &paths, render::Features::default());
    let again = render::render(&config, &inputs, &paths, render::Features::default());
    assert_eq!(rendered, again, "render is not deterministic");
    let text = rendered.text.expose();
    if let Some(c) = text.chars().find(|c| c.is_control() && *c != '\n') {
        panic!("haproxy.cfg holds the control character {c:?}:\n{text}");
    }
    let server_lines: Vec<&str> =
        text.lines().filter(|l| l.trim_start().starts_with("server ")).map(str::trim_start).collect();
    assert_eq!(server_lines.len(), 2 * config.masters.len(), "server lines:\n{text}");
    for m in &config.masters {
        for name in [m.name.clone(), format!("{}{}", m.name, render::FALLBACK_SUFFIX)] {
            let prefix = format!("server {name} {} ", m.address);
            assert_eq!(
                server_lines.iter().filter(|l| l.starts_with(&prefix)).count(),
                1,
                "no single line {prefix:?} in:\n{text}"
            );
        }
    }
    // The same config with every free-text path and name replaced by a
    // plain word renders to the same shape: as many lines, and outside
    // comments as many words and characters HAProxy's parser treats
    // specially on each line. Nothing from the config adds a line, splits
    // a word, starts a comment or opens a quote.
    let plain = plain_paths(&config);
    let Some(plain_inputs) = model_inputs(&plain) else {
        panic!("the plain config's files are not valid:\n{plain:?}");
    };
    let plain_rendered =
        render::render(&plain, &plain_inputs, &Paths::from_config(&plain), render::Features::default());
    let shape = |t: &str| -> Vec<(usize, usize)> {
        t.lines()
            .map(|l| {
                if l.trim_start().starts_with('#') {
                    (0, 0)
                } else {
                    (l.split_whitespace().count(), l.matches(['#', '"', '\'', '\\']).count())
                }
            })
            .collect()
    };
    assert_eq!(
        shape(text),
        shape(plain_rendered.text.expose()),
        "a value of the config changes the structure of haproxy.cfg:\n{text}"
    );
    // Redaction removes every part of the secrets: with other secrets of
    // the same shape, the redacted lines that hold them are identical.
    let Some(other_inputs) = model_inputs_with(&config, SECRETS[1]) else {
        panic!("other secrets of the same shape are not valid");
    };
    let other = render::render(&config, &other_inputs, &paths, render::Features::default());
    let secret_lines = |r: &render::Rendered| -> Vec<String> {
        r.redacted()
            .lines()
            .filter(|l| l.starts_with("    http-check send ") || l.starts_with("    user "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(secret_lines(&rendered), secret_lines(&other), "a part of a secret survives redaction");
}

/// Two (bearer token, stats password) pairs of the same shape, both valid
/// as read from their files. Each holds the characters that haproxy.cfg
/// escapes (`%`, `'`), and starts with `#`, which no other value on the
/// lines that hold them can contain.
const SECRETS: [(&str, &str); 2] = [
    ("#T1-token%with'quote-and-more", "#P1 pass'word%"),
    ("#T2-abcde%fghi'jklmn-opq-rstu", "#P2 abcd'efgh%"),
];

/// What `Inputs::gather` returns for `config` when every file it names
/// exists and is valid: the real resolver ([`Inputs::gather_with`], the
/// same verification and credential choice per `health.auth.mode`, the
/// config's paths and names in the same places) over files made up in
/// memory ([`ModelFiles`]), without reading any. `None` when the config
/// gives one path two roles no content can fill at once (the token file is
/// also the CA, say): `apilb check` refuses those too.
pub fn model_inputs(config: &Config) -> Option<Inputs> {
    model_inputs_with(config, SECRETS[0])
}

/// [`model_inputs`] with this bearer token and stats password.
fn model_inputs_with(config: &Config, (token, password): (&str, &str)) -> Option<Inputs> {
    let files = ModelFiles {
        token_file: config.health.auth.token_file.as_deref(),
        password_file: config.stats.as_ref().and_then(|s| s.auth.as_ref()).map(|a| a.password_file.as_path()),
        token,
        password,
    };
    Inputs::gather_with(config, &files).ok()
}

/// The files of a config as [`model_inputs`] makes them up: every path
/// exists; the token file holds the token, the stats password file the
/// password (the token when both are one file), and any other file a PEM
/// certificate followed by a PEM key, whose base64 is derived from its
/// path (so each file has its own digest).
struct ModelFiles<'a> {
    /// `health.auth.token_file`.
    token_file: Option<&'a Path>,
    /// `stats.auth.password_file`.
    password_file: Option<&'a Path>,
    /// What the token file holds.
    token: &'a str,
    /// What the password file holds.
    password: &'a str,
}

impl Files for ModelFiles<'_> {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        if self.token_file == Some(path) {
            return Ok(self.token.as_bytes().to_vec());
        }
        if self.password_file == Some(path) {
            return Ok(self.password.as_bytes().to_vec());
        }
        // 64 hex digits are valid base64 (48 bytes, no padding).
        let b64 = apilb::digest::sha256_hex(path.as_os_str().as_encoded_bytes());
        Ok(format!(
            "-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n\
             -----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n"
        )
        .into_bytes())
    }

    fn exists(&self, _: &Path) -> bool {
        true
    }
}

/// `config` with every path and free-text name replaced by a plain word:
/// one per role, so [`model_inputs`] fills every file (the stats password
/// file, which haproxy.cfg never names, gets its own word too, unless it is
/// the token file).
fn plain_paths(config: &Config) -> Config {
    let mut c = config.clone();
    let token_file = c.health.auth.token_file.clone();
    let plain = |p: &mut Option<PathBuf>, word: &str| {
        if p.is_some() {
            *p = Some(PathBuf::from(word));
        }
    };
    c.haproxy.runtime_dir = "/r".into();
    c.haproxy.state_dir = "/s".into();
    plain(&mut c.health.tls.ca_file, "/p");
    plain(&mut c.health.auth.token_file, "/t");
    plain(&mut c.health.auth.cert_file, "/c");
    plain(&mut c.health.auth.key_file, "/k");
    for wk in &mut c.health.auth.well_known {
        wk.name = "n".into();
        wk.cert_file = "/p".into();
        plain(&mut wk.key_file, "/k");
        plain(&mut wk.ca_file, "/p");
    }
    if let Some(auth) = c.stats.as_mut().and_then(|s| s.auth.as_mut()) {
        // One file for both stays one file: the password is then the token.
        auth.password_file =
            if token_file.as_ref() == Some(&auth.password_file) { "/t" } else { "/w" }.into();
    }
    c
}

/// Replies read from HAProxy's sockets and output: `show stat`,
/// `show proc`, `haproxy -v`, the lines of its stdout/stderr and the
/// status column. HAProxy is a process apilb does not control, so none of
/// these may panic whatever it prints.
pub fn haproxy_reply(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(stats) = stat::parse_show_stat(&text) {
        for s in &stats.servers {
            let _ = s.state();
        }
    }
    if let Ok(stats) = stat::parse_info_and_stat(&text) {
        let _ = (stats.worker_pid, stats.servers.len());
    }
    if let Ok(proc) = stat::parse_show_proc(&text) {
        let _ = proc.workers.len() + proc.old_workers.len();
    }
    let rendered = redacting_render();
    for line in text.lines() {
        let (_, _, msg) = output::parse_line(line);
        assert!(line.contains(msg), "parse_line invented {msg:?} from {line:?}");
        // What HAProxy prints is logged through the redactor.
        let logged = rendered.redact(msg);
        for secret in [SECRETS[0].0, SECRETS[0].1] {
            let prefix: String = secret.chars().take(6).collect();
            assert!(!logged.contains(&prefix), "{prefix:?} survives redaction in {logged:?}");
        }
        if let Some(v) = haproxy::parse_version(line) {
            assert!(line.contains(&v.full), "{v:?} from {line:?}");
        }
        let _ = stat::ServerState::from_status(line);
    }
}

/// A render with a bearer token and a stats password, made once.
fn redacting_render() -> &'static render::Rendered {
    static RENDERED: std::sync::OnceLock<render::Rendered> = std::sync::OnceLock::new();
    RENDERED.get_or_init(|| {
        let yaml = "masters: [10.0.0.1:6443]\n\
                    health: {tls: {insecure_skip_verify: true}, auth: {mode: bearer, token_file: /t}}\n\
                    stats: {auth: {user: u, password_file: /p}}\n";
        let config = Config::parse(yaml, "fuzz").unwrap_or_else(|e| panic!("{e}"));
        let Some(inputs) = model_inputs(&config) else {
            panic!("the redacting config's files are not valid")
        };
        render::render(&config, &inputs, &Paths::from_config(&config), render::Features::default())
    })
}

/// Answers of the Kubernetes API to the discovery watcher (untrusted
/// network input): the first line is a list response (EndpointSlices, or
/// Endpoints), every further line a watch event applied to it, as the
/// watcher does. After each step the ready addresses are computed for both
/// APIs, with and without `allowed_cidrs`, and fed to the master-set
/// policy. Checks that what discovery reports is sorted, unique, allowed
/// and survives the persisted file, and that the policy names every master
/// once with a valid name.
pub fn discovery(data: &[u8]) {
    let mut lines = data.split(|b| *b == b'\n');
    let first = lines.next().unwrap_or_default();
    let Ok((mut rv, mut objects)) = discovery::parse_list(first) else { return };
    check_discovered(&objects);
    for line in lines {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let before = (rv.clone(), objects.clone());
        if discovery::apply_event(line, Api::EndpointSlices, &mut rv, &mut objects).is_err() {
            assert_eq!(before, (rv, objects), "a refused event changed the state");
            return;
        }
        check_discovered(&objects);
    }
}

/// A watch stream as the network delivers it (untrusted): the first byte
/// seeds how the rest is cut into chunks, as TCP and TLS records would cut
/// it; each chunk is fed to discovery's line splitter, and each line it
/// yields to the event parser. Checks that no line ever exceeds the bound,
/// that lines come back exactly as sent (a chunking changes nothing), that
/// an over-long line is refused, and that the kept objects stay the API
/// servers' own.
pub fn discovery_stream(data: &[u8]) {
    const MAX: usize = 64;
    let Some((&seed, stream)) = data.split_first() else { return };
    let mut splitter = discovery::LineSplitter::new(MAX);
    let mut lines = Vec::new();
    let mut refused = false;
    let mut at = 0;
    let mut step = u64::from(seed) | 1;
    while at < stream.len() {
        step = step.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let len = 1 + (step >> 59) as usize;
        let chunk = &stream[at..(at + len).min(stream.len())];
        at += chunk.len();
        if splitter.push(chunk).is_err() {
            refused = true;
            break;
        }
        while let Some(line) = splitter.next_line() {
            lines.push(line);
        }
    }
    if !refused {
        lines.extend(splitter.finish());
    }
    for line in &lines {
        let body = line.strip_suffix(b"\n").unwrap_or(line);
        assert!(body.len() <= MAX, "a line of {} bytes passed a bound of {MAX}", body.len());
        assert!(!body.contains(&b'\n'));
    }
    // Unchunked, the same stream gives the same lines (or is refused too).
    // A blank line over the bound is refused too: the bound is on memory,
    // and whitespace takes as much as anything else.
    let all: Vec<&[u8]> = stream.split_inclusive(|b| *b == b'\n').collect();
    let too_long = all.iter().any(|l| l.strip_suffix(b"\n").unwrap_or(l).len() > MAX);
    let expected: Vec<&[u8]> = all.into_iter().filter(|l| !l.iter().all(u8::is_ascii_whitespace)).collect();
    assert_eq!(refused, too_long, "refusal does not match the longest line");
    if !refused {
        assert_eq!(lines.iter().map(Vec::as_slice).collect::<Vec<_>>(), expected);
    }
    let (mut rv, mut objects) = (String::new(), BTreeMap::new());
    for line in &lines {
        if discovery::apply_event(line, Api::EndpointSlices, &mut rv, &mut objects).is_err() {
            break;
        }
        assert!(objects.keys().all(|k| k == discovery::OWN_OBJECT), "kept a foreign object");
    }
}

/// Checks what discovery would report for `objects`, and what the policy
/// and the persisted file make of it.
fn check_discovered(objects: &BTreeMap<String, serde_json::Value>) {
    let allowed: Vec<Cidr> = ["10.0.0.0/8", "fd00::/8"].iter().filter_map(|c| c.parse().ok()).collect();
    for api in [Api::EndpointSlices, Api::Endpoints] {
        for cidrs in [&[][..], &allowed[..]] {
            let (found, _refused) = discovery::ready_addresses(objects.values(), api, cidrs);
            // The set discovery would use breaks no rule.
            let settings = apilb::config::KubernetesDiscovery {
                kubeconfig: None,
                via: apilb::config::Via::Local,
                allowed_cidrs: cidrs.to_vec(),
                max_masters: 4,
            };
            if let discovery::Decision::Use { addresses, .. } =
                discovery::decide(objects.values(), api, &settings)
            {
                assert!(!addresses.is_empty() && addresses.len() <= 4, "{addresses:?}");
                for a in &addresses {
                    if let apilb::config::Host::Ip(ip) = a.host {
                        let ip = ip.to_canonical();
                        assert!(
                            !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast()),
                            "discovery would use {a}"
                        );
                        if let std::net::IpAddr::V4(v4) = ip {
                            assert!(!v4.is_link_local() && !v4.is_broadcast(), "discovery would use {a}");
                        }
                    }
                }
            }
            assert!(found.windows(2).all(|w| (w[0].host_str(), w[0].port) < (w[1].host_str(), w[1].port)));
            for a in &found {
                assert!(a.port != 0);
                if let apilb::config::Host::Ip(ip) = a.host {
                    assert!(cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip)), "{a} not allowed");
                } else {
                    panic!("discovery reported the DNS name {a}");
                }
            }
            if found.is_empty() {
                continue;
            }
            let seeds = vec![Master { name: "seed".into(), address: found[0].clone() }];
            let sources = Sources { seeds, persisted: Vec::new(), discovered: Some(found.clone()) };
            let desired = sources.desired();
            assert_eq!(desired.len(), found.len());
            let names: HashSet<&str> = desired.iter().map(|m| m.name.as_str()).collect();
            assert_eq!(names.len(), desired.len(), "two masters share a name: {desired:?}");
            for m in &desired {
                assert!(
                    !m.name.is_empty()
                        && m.name.len() <= 63
                        && m.name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')),
                    "invalid server name {:?}",
                    m.name
                );
            }
            round_trip(&desired);
        }
    }
}

/// What `persist::save` writes, `persist::parse` reads back identically.
fn round_trip(masters: &[Master]) {
    let json = persist::to_json(masters, 0).unwrap_or_else(|e| panic!("cannot serialize {masters:?}: {e}"));
    let text = String::from_utf8_lossy(&json);
    assert_eq!(persist::parse(&text, Path::new("fuzz")).as_deref(), Ok(masters), "{text}");
}

/// The persisted master set (`masters.json` in the state directory): a
/// file apilb wrote, but maybe truncated or edited. What it accepts must
/// save and load back identically.
pub fn persisted(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(masters) = persist::parse(text, Path::new("fuzz")) {
        round_trip(&masters);
        let sources = Sources { seeds: Vec::new(), persisted: masters, discovered: None };
        let _ = sources.desired();
    }
}

/// A kubeconfig for discovery, with every file it names missing (no I/O).
pub fn kubeconfig(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let missing = |_: &Path| -> std::io::Result<Vec<u8>> { Err(std::io::ErrorKind::NotFound.into()) };
    if let Ok(access) = kubeconfig::parse(Path::new("/fuzz/kubeconfig"), text, &missing) {
        assert!(access.server.ends_with(|c: char| c.is_ascii_digit()), "{access:?}");
    }
}
