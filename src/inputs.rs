//! The files a config refers to: the CA, the check's credential and the
//! stats password, read and checked once per render.
//!
//! This is the only step of rendering that touches the filesystem. What it
//! returns ([`Inputs`]) plus the [`Config`] fully determines the rendered
//! haproxy.cfg, which keeps [`crate::render`] pure and deterministic. Every
//! file is read through [`Files`]: [`Disk`] for real, files made up in
//! memory in tests and the fuzz targets ([`Inputs::gather_with`]).
//!
//! The `auto` credential mode and the bootstrap rule live here: before a
//! node has joined the cluster it has no credential and often no CA yet, so
//! the check can only prove that an API server answers. That state is
//! reported (`bootstrap`), never hidden, and a credential is never sent to a
//! server whose certificate is not verified.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{AuthMode, Config, HealthAuth};
use crate::digest::sha256_hex;

/// A secret value. Its `Debug` and `Display` never print the content, and
/// its bytes are overwritten when it is dropped, so a core dump or a read
/// of freed memory finds fewer copies (best effort: transient copies made
/// while formatting a value are not tracked).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites a string's bytes with zeros, in a way the compiler keeps.
pub fn wipe(s: &mut String) {
    // SAFETY: zero bytes are valid UTF-8, and the length is unchanged.
    let bytes = unsafe { s.as_mut_vec() };
    for b in bytes.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

impl Secret {
    /// Wraps a secret string.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it is written to a 0600 file or
    /// sent to the server it is meant for.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod secret_tests {
    #[test]
    fn wipe_zeroes_the_bytes_in_place() {
        let mut s = String::from("hunter2-token");
        let (ptr, len) = (s.as_ptr(), s.len());
        super::wipe(&mut s);
        assert_eq!(s.as_ptr(), ptr);
        // SAFETY: the string still owns this buffer.
        assert!(unsafe { std::slice::from_raw_parts(ptr, len) }.iter().all(|b| *b == 0));
        assert_eq!(format!("{:?}", super::Secret::new("x")), "Secret(<redacted>)");
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A file referenced by the config is missing, unreadable or malformed.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {}: {problem}", path.display())]
pub struct InputError {
    /// The config field that names the file, e.g. `health.tls.ca_file`.
    pub field: String,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

/// How the check verifies the API server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Against this CA bundle.
    Ca {
        /// The CA file HAProxy loads.
        path: PathBuf,
        /// SHA-256 of its content, so a changed CA changes the rendered
        /// config and triggers a reload.
        digest: String,
        /// Its content, as read and validated. HAProxy loads a copy in the
        /// runtime directory, never `path` itself: under the unit it runs
        /// without the capability that reads root-only files.
        pem: String,
    },
    /// Not at all, because the user set `insecure_skip_verify`.
    Insecure,
    /// Not at all, because `auto` found no CA yet (bootstrap).
    BootstrapNoCa,
}

/// The credential the check presents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// None.
    Anonymous,
    /// `Authorization: Bearer …`.
    Bearer {
        /// The token.
        token: Secret,
        /// Where it was read from.
        path: PathBuf,
    },
    /// A client certificate, presented on the check's TLS handshake.
    ClientCert {
        /// Certificate chain followed by the key, as HAProxy's `crt` wants.
        bundle: Secret,
        /// SHA-256 of the bundle; names the file written for HAProxy.
        digest: String,
        /// Where the certificate was read from.
        cert_path: PathBuf,
    },
}

impl Credential {
    /// Short name for logs, metrics and status.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::Anonymous => "none",
            Credential::Bearer { .. } => "bearer",
            Credential::ClientCert { .. } => "client_cert",
        }
    }
}

/// The check's resolved TLS verification and credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckAuth {
    /// Certificate verification.
    pub verify: Verify,
    /// What is presented to the server.
    pub credential: Credential,
    /// True when no credential could be used, so 401/403 also count as
    /// "alive" (the node has not joined yet). Only in `auto` mode.
    pub bootstrap: bool,
    /// Where the credential came from, in words (e.g. `k3s-agent
    /// (/var/lib/rancher/k3s/agent/client-kubelet.crt)`).
    pub source: String,
    /// Things `apilb check` should tell the user (files not found, a
    /// credential ignored for lack of a CA).
    pub notes: Vec<String>,
}

impl CheckAuth {
    /// The mode in effect, for metrics and status: the credential kind, or
    /// `bootstrap`.
    pub fn mode_in_use(&self) -> &'static str {
        if self.bootstrap { "bootstrap" } else { self.credential.kind() }
    }

    /// The HTTP statuses that count as alive, sorted, without duplicates:
    /// `expect_status` (`health.expect_status`), and in bootstrap mode also
    /// 401 and 403 (the server answers; the node has no credential yet).
    /// The rendered check and `apilb probe` both ask this.
    pub fn accepted_statuses(&self, expect_status: &[u16]) -> Vec<u16> {
        let mut statuses = expect_status.to_vec();
        if self.bootstrap {
            statuses.extend([401, 403]);
        }
        statuses.sort_unstable();
        statuses.dedup();
        statuses
    }
}

/// Everything read from disk for one render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// The check's verification and credential.
    pub check: CheckAuth,
    /// The stats password, when `stats.auth` is configured.
    pub stats_password: Option<Secret>,
    /// Who HAProxy's workers run as (`haproxy.user`, looked up), when
    /// they can drop root.
    pub run_as: Option<RunAs>,
}

/// A user and group for HAProxy's workers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// The user's name.
    pub user: String,
    /// The name of its primary group.
    pub group: String,
}

/// Where [`Inputs::gather_with`] reads the files a config names from: the
/// filesystem ([`Disk`]), or files made up in memory (tests, the fuzz
/// targets), so the same resolution rules run on both.
pub trait Files {
    /// The content of the file at `path`.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Whether something exists at `path`. Like [`Path::exists`], false
    /// also when it cannot be told (e.g. a directory on the way that
    /// cannot be searched); a file that exists but cannot be read is true,
    /// and its read fails.
    fn exists(&self, path: &Path) -> bool;
}

/// The real filesystem: what [`Inputs::gather`] reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Disk;

impl Files for Disk {
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        std::fs::read(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

impl Inputs {
    /// Reads every file the config refers to, and looks up the user
    /// HAProxy's workers run as.
    pub fn gather(config: &Config) -> Result<Inputs, InputError> {
        let files = Self::gather_with(config, &Disk)?;
        Ok(Inputs { run_as: run_as(&config.haproxy.user, &config.haproxy.runtime_dir)?, ..files })
    }

    /// Reads every file the config refers to through `files`, with the same
    /// checks and the same `auto` rules as [`Inputs::gather`], which calls
    /// it with [`Disk`]. Touches nothing else: `run_as` is left `None` (the
    /// user lookup is `gather`'s).
    pub fn gather_with(config: &Config, files: &dyn Files) -> Result<Inputs, InputError> {
        let stats_password = match config.stats.as_ref().and_then(|s| s.auth.as_ref()) {
            Some(auth) => Some(read_password(files, &auth.password_file)?),
            None => None,
        };
        Ok(Inputs { check: resolve_check(files, config)?, stats_password, run_as: None })
    }
}

/// Looks `haproxy.user` up. Only root can drop to another user, so an agent
/// that does not run as root (apilb.service's, which runs as `apilb`; a
/// developer's) keeps HAProxy as it is.
///
/// Whether the agent runs as root is read from the owner of its runtime
/// directory, which the agent creates and refuses when it is not its own;
/// only before the first start is it the caller's own uid. So `apilb
/// render` and `apilb check`, run as root, render what an agent running
/// as `apilb` runs, and their hash matches the one it reports.
fn run_as(user: &str, runtime_dir: &Path) -> Result<Option<RunAs>, InputError> {
    use std::os::unix::fs::MetadataExt;
    let agent_is_root = match std::fs::metadata(runtime_dir) {
        Ok(m) => m.uid() == 0,
        Err(_) => nix::unistd::geteuid().is_root(),
    };
    if user.is_empty() || !agent_is_root {
        return Ok(None);
    }
    let missing =
        |problem: String| InputError { field: "haproxy.user".into(), path: "/etc/passwd".into(), problem };
    let found =
        nix::unistd::User::from_name(user).map_err(|e| missing(format!("cannot look up {user:?}: {e}")))?;
    let Some(u) = found else {
        return Err(missing(format!(
            "no user {user:?} (the haproxy package creates it; or set haproxy.user: \"\" to keep HAProxy's workers \
             as root)"
        )));
    };
    if u.uid.is_root() {
        return Ok(None);
    }
    let group = nix::unistd::Group::from_gid(u.gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .ok_or_else(|| missing(format!("the primary group of {user:?} (gid {}) has no name", u.gid)))?;
    Ok(Some(RunAs { user: u.name, group }))
}

/// Reads a text file through `files`, failing like [`std::fs::read_to_string`]
/// when it is not UTF-8.
fn read_text(files: &dyn Files, path: &Path) -> io::Result<String> {
    String::from_utf8(files.read(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
}

fn io_err(field: &str, path: &Path, e: std::io::Error) -> InputError {
    let problem = match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_owned(),
        std::io::ErrorKind::PermissionDenied => concat!(
            "permission denied (apilb.service reads files as the apilb user with CAP_DAC_READ_SEARCH; ",
            "run by hand, apilb needs root or the file's owner)"
        )
        .to_owned(),
        _ => e.to_string(),
    };
    InputError { field: field.to_owned(), path: path.to_owned(), problem }
}

fn bad(field: &str, path: &Path, problem: impl Into<String>) -> InputError {
    InputError { field: field.to_owned(), path: path.to_owned(), problem: problem.into() }
}

/// Reads a PEM file that must hold at least one certificate; returns its
/// bytes.
fn read_certificates(files: &dyn Files, field: &str, path: &Path) -> Result<Vec<u8>, InputError> {
    let data = files.read(path).map_err(|e| io_err(field, path, e))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(field, path, format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad(field, path, "holds no PEM certificate"));
    }
    Ok(data)
}

/// Reads a CA bundle and checks that it holds at least one certificate.
fn read_ca(files: &dyn Files, field: &str, path: &Path) -> Result<Verify, InputError> {
    let data = read_certificates(files, field, path)?;
    let pem = String::from_utf8(data).map_err(|_| bad(field, path, "is not valid PEM: not UTF-8"))?;
    Ok(Verify::Ca { path: path.to_owned(), digest: sha256_hex(pem.as_bytes()), pem })
}

/// Reads a bearer token: one line of visible ASCII.
fn read_token(files: &dyn Files, field: &str, path: &Path) -> Result<Secret, InputError> {
    let data = read_text(files, path).map_err(|e| io_err(field, path, e))?;
    let token = data.trim();
    if token.is_empty() {
        return Err(bad(field, path, "is empty"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
        return Err(bad(
            field,
            path,
            "holds characters a bearer token cannot contain (whitespace, quotes, '\\' or non-ASCII)",
        ));
    }
    Ok(Secret::new(token))
}

/// Reads a stats password: one line of printable ASCII.
fn read_password(files: &dyn Files, path: &Path) -> Result<Secret, InputError> {
    const FIELD: &str = "stats.auth.password_file";
    let data = read_text(files, path).map_err(|e| io_err(FIELD, path, e))?;
    let pw = data.strip_suffix('\n').unwrap_or(&data);
    let pw = pw.strip_suffix('\r').unwrap_or(pw);
    if pw.is_empty() {
        return Err(bad(FIELD, path, "is empty"));
    }
    if !pw.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err(bad(FIELD, path, "must hold one line of printable ASCII"));
    }
    Ok(Secret::new(pw))
}

/// The client certificate `cert` that `health.auth` configures, with its
/// key file when one is set.
fn read_configured_cert(files: &dyn Files, auth: &HealthAuth, cert: &Path) -> Result<Credential, InputError> {
    read_client_cert(files, "health.auth.cert_file", cert, "health.auth.key_file", auth.key_file.as_deref())
}

/// Reads a client certificate and its key (from `key` or from the cert
/// file itself) and returns the bundle HAProxy's `crt` expects.
fn read_client_cert(
    files: &dyn Files,
    cert_field: &str,
    cert: &Path,
    key_field: &str,
    key: Option<&Path>,
) -> Result<Credential, InputError> {
    let cert_pem = read_certificates(files, cert_field, cert)?;
    let (key_pem, key_path, key_field) = match key {
        Some(k) => (files.read(k).map_err(|e| io_err(key_field, k, e))?, k, key_field),
        None => (cert_pem.clone(), cert, cert_field),
    };
    if PrivateKeyDer::from_pem_slice(&key_pem).is_err() {
        let hint = if key.is_none() { " (set key_file when the key is in its own file)" } else { "" };
        return Err(bad(key_field, key_path, format!("holds no PEM private key{hint}")));
    }
    let mut bundle = String::from_utf8_lossy(&cert_pem).into_owned();
    if key.is_some() {
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&String::from_utf8_lossy(&key_pem));
    }
    let digest = sha256_hex(bundle.as_bytes());
    Ok(Credential::ClientCert { bundle: Secret::new(bundle), digest, cert_path: cert.to_owned() })
}

/// Added to "no such file" for the CA of an explicit mode: typically the
/// node's own copy of the cluster CA, which k3s and RKE2 write only when the
/// node joins (docs/migration.md).
const CA_NOT_YET: &str = " (a node's copy of the cluster CA, such as k3s's agent/server-ca.crt, appears \
                          only when the node joins: before that, point ca_file at a copy of the CA taken \
                          from a server, or use health.auth.mode auto, which checks in bootstrap mode until \
                          the CA and a credential exist)";

fn resolve_check(files: &dyn Files, config: &Config) -> Result<CheckAuth, InputError> {
    let tls = &config.health.tls;
    let auth = &config.health.auth;
    let explicit_verify = || -> Result<Verify, InputError> {
        match &tls.ca_file {
            Some(ca) => read_ca(files, "health.tls.ca_file", ca).map_err(|mut e| {
                if !files.exists(ca) {
                    e.problem.push_str(CA_NOT_YET);
                }
                e
            }),
            None => Ok(Verify::Insecure),
        }
    };
    let fixed = |verify: Verify, credential: Credential, source: String| CheckAuth {
        verify,
        credential,
        bootstrap: false,
        source,
        notes: Vec::new(),
    };
    match auth.mode {
        AuthMode::None => Ok(fixed(explicit_verify()?, Credential::Anonymous, "none".into())),
        AuthMode::Bearer => {
            let path = auth.token_file.as_deref().unwrap_or(Path::new(""));
            let token = read_token(files, "health.auth.token_file", path)?;
            let source = format!("token file {}", path.display());
            Ok(fixed(explicit_verify()?, Credential::Bearer { token, path: path.to_owned() }, source))
        }
        AuthMode::ClientCert => {
            let cert = auth.cert_file.as_deref().unwrap_or(Path::new(""));
            let cred = read_configured_cert(files, auth, cert)?;
            Ok(fixed(explicit_verify()?, cred, format!("certificate {}", cert.display())))
        }
        AuthMode::Auto => resolve_auto(files, config),
    }
}

/// `auto`: the configured files first, then the well-known locations; the
/// first credential that exists wins. Files that exist but are broken are
/// errors, not skipped: silently falling through to another identity would
/// hide a real problem.
fn resolve_auto(files: &dyn Files, config: &Config) -> Result<CheckAuth, InputError> {
    let tls = &config.health.tls;
    let auth = &config.health.auth;
    let mut notes = Vec::new();

    // The CA: configured, else taken from the well-known entry that
    // provided the credential.
    let configured_ca = match &tls.ca_file {
        Some(ca) if files.exists(ca) => Some(read_ca(files, "health.tls.ca_file", ca)?),
        Some(ca) => {
            notes.push(format!("health.tls.ca_file {} does not exist (yet)", ca.display()));
            None
        }
        None if tls.insecure_skip_verify => Some(Verify::Insecure),
        None => None,
    };

    let found = find_credential(files, auth, &mut notes)?;

    match found {
        Some((credential, source, paired_ca)) => match configured_ca.or(paired_ca) {
            Some(verify) => Ok(CheckAuth { verify, credential, bootstrap: false, source, notes }),
            None => {
                notes.push(format!(
                    "found {source} but no CA to verify the API servers with; the credential is not \
                     sent to unverified servers. Set health.tls.ca_file"
                ));
                Ok(bootstrap(Verify::BootstrapNoCa, notes))
            }
        },
        None => {
            notes.push(
                "no credential found (the node has probably not joined yet): checks accept \
                 401/403 as \"alive, readiness unknown\" until one appears"
                    .into(),
            );
            let verify = match configured_ca {
                Some(v) => v,
                None => first_existing_ca(files, config)?.unwrap_or(Verify::BootstrapNoCa),
            };
            Ok(bootstrap(verify, notes))
        }
    }
}

/// A credential found in `auto` mode: it, where it came from (in words),
/// and the CA of the well-known entry that provided it.
type Found = (Credential, String, Option<Verify>);

/// The configured client certificate, else the token, else the first
/// well-known credential that exists; notes what is configured but missing.
fn find_credential(
    files: &dyn Files,
    auth: &HealthAuth,
    notes: &mut Vec<String>,
) -> Result<Option<Found>, InputError> {
    let mut found: Option<Found> = None;
    if let Some(cert) = &auth.cert_file {
        if files.exists(cert) {
            let cred = read_configured_cert(files, auth, cert)?;
            found = Some((cred, format!("certificate {}", cert.display()), None));
        } else {
            notes.push(format!("health.auth.cert_file {} does not exist (yet)", cert.display()));
        }
    }
    if let (None, Some(tok)) = (&found, &auth.token_file) {
        if files.exists(tok) {
            let token = read_token(files, "health.auth.token_file", tok)?;
            let cred = Credential::Bearer { token, path: tok.clone() };
            found = Some((cred, format!("token file {}", tok.display()), None));
        } else {
            notes.push(format!("health.auth.token_file {} does not exist (yet)", tok.display()));
        }
    }
    if found.is_none() {
        found = well_known_credential(files, auth)?;
    }
    Ok(found)
}

/// The first well-known credential whose certificate exists, with its CA
/// when that exists too.
fn well_known_credential(files: &dyn Files, auth: &HealthAuth) -> Result<Option<Found>, InputError> {
    for (i, wk) in auth.well_known.iter().enumerate() {
        if !files.exists(&wk.cert_file) {
            continue;
        }
        let field = format!("health.auth.well_known[{i}]");
        let cred = read_client_cert(
            files,
            &format!("{field}.cert_file"),
            &wk.cert_file,
            &format!("{field}.key_file"),
            wk.key_file.as_deref(),
        )?;
        let ca = match &wk.ca_file {
            Some(ca) if files.exists(ca) => Some(read_ca(files, &format!("{field}.ca_file"), ca)?),
            _ => None,
        };
        return Ok(Some((cred, format!("{} ({})", wk.name, wk.cert_file.display()), ca)));
    }
    Ok(None)
}

fn first_existing_ca(files: &dyn Files, config: &Config) -> Result<Option<Verify>, InputError> {
    for (i, wk) in config.health.auth.well_known.iter().enumerate() {
        if let Some(ca) = wk.ca_file.as_deref().filter(|p| files.exists(p)) {
            return read_ca(files, &format!("health.auth.well_known[{i}].ca_file"), ca).map(Some);
        }
    }
    Ok(None)
}

fn bootstrap(verify: Verify, notes: Vec<String>) -> CheckAuth {
    CheckAuth {
        verify,
        credential: Credential::Anonymous,
        bootstrap: true,
        source: "no usable credential yet".into(),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Files made up in memory; everything else does not exist.
    #[derive(Default)]
    struct Memory(HashMap<PathBuf, Vec<u8>>);

    impl Memory {
        fn with(mut self, path: &str, content: &str) -> Self {
            self.0.insert(path.into(), content.as_bytes().to_vec());
            self
        }
    }

    impl Files for Memory {
        fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
            self.0.get(path).cloned().ok_or_else(|| io::ErrorKind::NotFound.into())
        }
        fn exists(&self, path: &Path) -> bool {
            self.0.contains_key(path)
        }
    }

    /// PEM that passes the checks here (they do not parse the DER).
    const CERT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
    const K3S_CERT: &str = "/var/lib/rancher/k3s/agent/client-kubelet.crt";
    const K3S_KEY: &str = "/var/lib/rancher/k3s/agent/client-kubelet.key";
    const K3S_CA: &str = "/var/lib/rancher/k3s/agent/server-ca.crt";

    fn config(health: &str) -> Config {
        Config::parse(&format!("masters: [10.0.0.1:6443]\n{health}"), "t").unwrap_or_else(|e| panic!("{e}"))
    }

    fn ca(path: &str) -> Verify {
        Verify::Ca { path: path.into(), digest: sha256_hex(CERT.as_bytes()), pem: CERT.into() }
    }

    #[test]
    fn auto_picks_the_first_well_known_credential_with_its_ca() {
        let files = Memory::default().with(K3S_CERT, CERT).with(K3S_KEY, KEY).with(K3S_CA, CERT);
        let inputs = Inputs::gather_with(&config(""), &files).unwrap();
        let check = inputs.check;
        assert!(!check.bootstrap);
        assert_eq!(check.verify, ca(K3S_CA));
        assert!(matches!(&check.credential, Credential::ClientCert { cert_path, bundle, .. }
            if cert_path == Path::new(K3S_CERT) && bundle.expose() == format!("{CERT}{KEY}")));
        assert_eq!(check.source, format!("k3s-agent ({K3S_CERT})"));
        assert_eq!(check.notes, Vec::<String>::new());
        assert_eq!((inputs.stats_password, inputs.run_as), (None, None));
    }

    #[test]
    fn auto_prefers_the_configured_files_to_the_well_known_ones() {
        let files = Memory::default()
            .with("/t", "tok-en\n")
            .with("/ca", CERT)
            .with(K3S_CERT, CERT)
            .with(K3S_KEY, KEY)
            .with(K3S_CA, CERT);
        let c = config("health: {tls: {ca_file: /ca}, auth: {token_file: /t, cert_file: /missing}}\n");
        let check = Inputs::gather_with(&c, &files).unwrap().check;
        assert_eq!(check.credential, Credential::Bearer { token: Secret::new("tok-en"), path: "/t".into() });
        assert_eq!(check.verify, ca("/ca"));
        assert_eq!(check.source, "token file /t");
        assert_eq!(check.notes, ["health.auth.cert_file /missing does not exist (yet)"]);
    }

    #[test]
    fn auto_without_a_credential_checks_in_bootstrap_mode() {
        let check = Inputs::gather_with(&config(""), &Memory::default()).unwrap().check;
        assert!(check.bootstrap);
        assert_eq!(check.mode_in_use(), "bootstrap");
        assert_eq!((&check.verify, &check.credential), (&Verify::BootstrapNoCa, &Credential::Anonymous));
        assert!(check.notes[0].starts_with("no credential found"), "{:?}", check.notes);
        // A well-known CA alone verifies the servers, still in bootstrap.
        let rke2_ca = "/var/lib/rancher/rke2/agent/server-ca.crt";
        let check = Inputs::gather_with(&config(""), &Memory::default().with(rke2_ca, CERT)).unwrap().check;
        assert!(check.bootstrap);
        assert_eq!(check.verify, ca(rke2_ca));
    }

    #[test]
    fn auto_never_sends_a_credential_without_a_ca() {
        let files = Memory::default().with(K3S_CERT, CERT).with(K3S_KEY, KEY);
        let check = Inputs::gather_with(&config(""), &files).unwrap().check;
        assert!(check.bootstrap);
        assert_eq!((&check.verify, &check.credential), (&Verify::BootstrapNoCa, &Credential::Anonymous));
        assert!(
            check.notes.iter().any(|n| n.starts_with(&format!("found k3s-agent ({K3S_CERT}) but no CA")))
        );
    }

    #[test]
    fn a_broken_file_that_exists_is_an_error_not_skipped() {
        let files = Memory::default().with(K3S_CERT, "not PEM").with(K3S_KEY, KEY).with(K3S_CA, CERT);
        let e = Inputs::gather_with(&config(""), &files).unwrap_err();
        assert_eq!(e.field, "health.auth.well_known[0].cert_file");
        assert_eq!(e.problem, "holds no PEM certificate");
    }

    #[test]
    fn the_stats_password_and_explicit_modes_read_through_the_seam() {
        let c = config(
            "health: {tls: {insecure_skip_verify: true}, auth: {mode: bearer, token_file: /t}}\n\
             stats: {auth: {user: u, password_file: /p}}\n",
        );
        let files = Memory::default().with("/t", "tok").with("/p", "pass word\n");
        let inputs = Inputs::gather_with(&c, &files).unwrap();
        assert_eq!(inputs.stats_password, Some(Secret::new("pass word")));
        assert_eq!(inputs.check.verify, Verify::Insecure);
        let e = Inputs::gather_with(&c, &Memory::default().with("/t", "tok")).unwrap_err();
        assert_eq!((e.field.as_str(), e.problem.as_str()), ("stats.auth.password_file", "no such file"));
    }

    #[test]
    fn a_text_file_that_is_not_utf8_fails_as_read_to_string_does() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, b"\xff\xfe").unwrap();
        let ours = read_text(&Disk, &path).unwrap_err();
        let std = std::fs::read_to_string(&path).unwrap_err();
        assert_eq!((ours.kind(), ours.to_string()), (std.kind(), std.to_string()));
    }
}
