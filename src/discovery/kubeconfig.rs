//! The parts of a kubeconfig apilb needs: the current context's server,
//! CA, client certificate or token. Relative paths are relative to the
//! kubeconfig's directory, as kubectl resolves them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::inputs::Secret;
use crate::tls::{self, ServerVerification, TlsError};

/// A kubeconfig that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("kubeconfig {}: {problem}", path.display())]
pub struct KubeconfigError {
    /// The kubeconfig.
    pub path: PathBuf,
    /// What is wrong.
    #[source]
    pub problem: KubeconfigProblem,
}

/// What is wrong with a kubeconfig, one variant per step of reading it.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigProblem {
    /// The kubeconfig itself cannot be read.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// It is not YAML, or not shaped like a kubeconfig.
    #[error("{0}")]
    Yaml(#[source] serde_yaml::Error),
    /// `current-context` names no context (or there is none at all).
    #[error("no context {0:?}")]
    NoContext(String),
    /// The context names a cluster that is not there.
    #[error("no cluster {0:?}")]
    NoCluster(String),
    /// The cluster's `server` is not an `https://` URL.
    #[error("server {0:?} is not an https:// URL")]
    NotHttps(String),
    /// The server's IPv6 host has no closing `]`.
    #[error("server {0:?}: unclosed '['")]
    UnclosedBracket(String),
    /// The server's port is not a number in range.
    #[error("server {url:?}: bad port {port:?}")]
    BadPort {
        /// The server URL.
        url: String,
        /// The port as written.
        port: String,
    },
    /// `certificate-authority-data` is not base64.
    #[error("certificate-authority-data: {0}")]
    CaData(#[source] Base64Error),
    /// `certificate-authority` cannot be read.
    #[error("certificate-authority {}: {source}", path.display())]
    CaFile {
        /// The CA file, resolved.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// Verification is on and the cluster names no CA.
    #[error("the cluster has no certificate-authority")]
    NoCa,
    /// The CA's PEM holds a block that is not a usable certificate.
    #[error("CA: {0}")]
    Ca(#[source] TlsError),
    /// The CA's PEM holds no certificate.
    #[error("the CA holds no certificate")]
    EmptyCa,
    /// A user's `<what>-data` (client certificate or key) is not base64.
    #[error("{what}-data: {source}")]
    PemData {
        /// `client-certificate` or `client-key`.
        what: &'static str,
        /// The decoding error.
        #[source]
        source: Base64Error,
    },
    /// A user's `<what>` file (client certificate or key) cannot be read.
    #[error("{what} {}: {source}", path.display())]
    PemFile {
        /// `client-certificate` or `client-key`.
        what: &'static str,
        /// The file, resolved.
        path: PathBuf,
        /// Why it cannot be read.
        #[source]
        source: std::io::Error,
    },
    /// The user's `tokenFile` cannot be read or is not UTF-8.
    #[error("tokenFile: {0}")]
    TokenFile(#[source] std::io::Error),
    /// The client certificate's PEM cannot be decoded.
    #[error("client certificate: {0}")]
    ClientCertificate(#[source] rustls::pki_types::pem::Error),
    /// The client key's PEM cannot be decoded or holds no key.
    #[error("client key: {0}")]
    ClientKey(#[source] rustls::pki_types::pem::Error),
    /// rustls cannot build the client (e.g. the key does not match).
    #[error("{0}")]
    Tls(#[source] TlsError),
    /// The user can authenticate neither way.
    #[error("the user has no client certificate or token")]
    NoCredential,
}

/// A character that is not standard or URL-safe base64.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid base64 character {0:?}")]
pub struct Base64Error(pub char);

/// The kubeconfig's server cannot be resolved (with `via: kubeconfig`).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver failed.
    #[error("cannot resolve {server}: {source}")]
    Failed {
        /// `host:port`.
        server: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name has no address.
    #[error("{0} resolves to no address")]
    NoAddress(String),
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    clusters: Vec<Named<Cluster>>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context", default)]
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    cluster: T,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: String,
}

#[derive(Deserialize)]
struct Cluster {
    server: String,
    #[serde(rename = "certificate-authority")]
    ca_file: Option<PathBuf>,
    #[serde(rename = "certificate-authority-data")]
    ca_data: Option<String>,
    #[serde(rename = "tls-server-name")]
    tls_server_name: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(rename = "client-certificate")]
    cert_file: Option<PathBuf>,
    #[serde(rename = "client-certificate-data")]
    cert_data: Option<String>,
    #[serde(rename = "client-key")]
    key_file: Option<PathBuf>,
    #[serde(rename = "client-key-data")]
    key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
}

/// How to reach and authenticate to the API server.
#[derive(Clone)]
pub struct KubeAccess {
    /// The kubeconfig it came from.
    pub path: PathBuf,
    /// `host:port` of the kubeconfig's server.
    pub server: String,
    /// The host part of the server (for verification by default).
    pub server_host: String,
    /// `tls-server-name`, when set.
    pub tls_server_name: Option<String>,
    /// TLS client settings: the CA, the client certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// A bearer token, when the user has one.
    pub token: Option<Secret>,
    /// `client_cert` or `bearer`: what authenticates the requests.
    pub auth: &'static str,
    /// The kubeconfig says `insecure-skip-tls-verify: true`: the API
    /// server's certificate is not verified (said in the log and by
    /// `apilb check`, never silently).
    pub insecure: bool,
}

impl std::fmt::Debug for KubeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAccess")
            .field("path", &self.path)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl KubeAccess {
    /// Where to connect when going straight to the kubeconfig's server.
    pub fn server_addr(&self) -> Result<SocketAddr, ResolveError> {
        use std::net::ToSocketAddrs;
        self.server
            .to_socket_addrs()
            .map_err(|source| ResolveError::Failed { server: self.server.clone(), source })?
            .next()
            .ok_or_else(|| ResolveError::NoAddress(self.server.clone()))
    }
}

/// Reads the kubeconfig at `path`.
pub fn load(path: &Path) -> Result<KubeAccess, KubeconfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KubeconfigError { path: path.to_owned(), problem: KubeconfigProblem::Read(e) })?;
    parse(path, &text, &|p: &Path| std::fs::read(p))
}

/// Builds the access from the kubeconfig `text` found at `path`; `read`
/// reads the files it refers to (the only I/O).
pub fn parse(
    path: &Path,
    text: &str,
    read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<KubeAccess, KubeconfigError> {
    let err = |problem: KubeconfigProblem| KubeconfigError { path: path.to_owned(), problem };
    let raw: Raw = serde_yaml::from_str(text).map_err(|e| err(KubeconfigProblem::Yaml(e)))?;
    let files = Files { base: path.parent().unwrap_or(Path::new("/")), read };
    let (cluster, user) = current(&raw).map_err(err)?;
    let (server, server_host) = parse_server(&cluster.server).map_err(err)?;

    let provider = tls::provider();
    let verification = if cluster.insecure {
        ServerVerification::Custom(tls::accept_any_certificate(provider.clone()))
    } else {
        ServerVerification::Roots(cluster_roots(cluster, &files).map_err(err)?)
    };
    let creds = match user {
        Some(u) => user_credentials(u, &files).map_err(err)?,
        None => UserCredentials::default(),
    };
    let (client, auth) = match (&creds.cert, &creds.key) {
        (Some(chain_pem), Some(key_pem)) => (Some(tls::ClientCert { chain_pem, key_pem }), "client_cert"),
        _ if creds.token.is_some() => (None, "bearer"),
        _ => (None, "none"),
    };
    let tls = tls::client_config(provider, verification, client).map_err(|e| {
        err(match e {
            TlsError::ClientChain(e) => KubeconfigProblem::ClientCertificate(e),
            TlsError::ClientKey(e) => KubeconfigProblem::ClientKey(e),
            e => KubeconfigProblem::Tls(e),
        })
    })?;
    if auth == "none" {
        return Err(err(KubeconfigProblem::NoCredential));
    }
    Ok(KubeAccess {
        path: path.to_owned(),
        server,
        server_host,
        tls_server_name: cluster.tls_server_name.clone(),
        tls: Arc::new(tls),
        token: creds.token,
        auth,
        insecure: cluster.insecure,
    })
}

/// The files a kubeconfig refers to: relative paths are relative to its
/// directory, as kubectl resolves them.
struct Files<'a> {
    /// The kubeconfig's directory.
    base: &'a Path,
    /// Reads a file (the only I/O of parsing).
    read: &'a dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
}

impl Files<'_> {
    /// `p`, resolved against the kubeconfig's directory.
    fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_owned() } else { self.base.join(p) }
    }

    /// Inline base64 `data` (`<what>-data`) or the file it names (`<what>`).
    fn pem(
        &self,
        data: &Option<String>,
        file: &Option<PathBuf>,
        what: &'static str,
    ) -> Result<Option<Vec<u8>>, KubeconfigProblem> {
        match (data, file) {
            (Some(d), _) => {
                decode_base64(d).map(Some).map_err(|source| KubeconfigProblem::PemData { what, source })
            }
            (None, Some(f)) => {
                let path = self.resolve(f);
                (self.read)(&path).map(Some).map_err(|source| KubeconfigProblem::PemFile {
                    what,
                    path,
                    source,
                })
            }
            (None, None) => Ok(None),
        }
    }
}

/// The current context's cluster and user (the first context when none is
/// current).
fn current(raw: &Raw) -> Result<(&Cluster, Option<&User>), KubeconfigProblem> {
    let context = if raw.current_context.is_empty() {
        raw.contexts.first()
    } else {
        raw.contexts.iter().find(|c| c.name == raw.current_context)
    }
    .ok_or_else(|| KubeconfigProblem::NoContext(raw.current_context.clone()))?;
    let cluster = raw
        .clusters
        .iter()
        .find(|c| c.name == context.context.cluster)
        .map(|c| &c.cluster)
        .ok_or_else(|| KubeconfigProblem::NoCluster(context.context.cluster.clone()))?;
    let user = raw.users.iter().find(|u| u.name == context.context.user).map(|u| &u.user);
    Ok((cluster, user))
}

/// The roots the cluster's certificate-authority(-data) holds.
fn cluster_roots(cluster: &Cluster, files: &Files<'_>) -> Result<rustls::RootCertStore, KubeconfigProblem> {
    let ca_pem = match (&cluster.ca_data, &cluster.ca_file) {
        (Some(data), _) => decode_base64(data).map_err(KubeconfigProblem::CaData)?,
        (None, Some(file)) => {
            let path = files.resolve(file);
            (files.read)(&path).map_err(|source| KubeconfigProblem::CaFile { path, source })?
        }
        (None, None) => return Err(KubeconfigProblem::NoCa),
    };
    let roots = tls::roots(&ca_pem).map_err(KubeconfigProblem::Ca)?;
    if roots.is_empty() {
        return Err(KubeconfigProblem::EmptyCa);
    }
    Ok(roots)
}

/// What a kubeconfig user holds: PEM of a client certificate and key, a
/// token.
#[derive(Default)]
struct UserCredentials {
    /// The client certificate chain.
    cert: Option<Vec<u8>>,
    /// The client key.
    key: Option<Vec<u8>>,
    /// A bearer token, trimmed.
    token: Option<Secret>,
}

/// Reads the user's client certificate, key and token (inline or files).
fn user_credentials(u: &User, files: &Files<'_>) -> Result<UserCredentials, KubeconfigProblem> {
    let cert = files.pem(&u.cert_data, &u.cert_file, "client-certificate")?;
    let key = files.pem(&u.key_data, &u.key_file, "client-key")?;
    let token = if let Some(t) = &u.token {
        Some(Secret::new(t.trim()))
    } else if let Some(f) = &u.token_file {
        let t = (files.read)(&files.resolve(f))
            .and_then(|b| {
                String::from_utf8(b).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8")
                })
            })
            .map_err(KubeconfigProblem::TokenFile)?;
        Some(Secret::new(t.trim()))
    } else {
        None
    };
    Ok(UserCredentials { cert, key, token })
}

/// `https://host:port` → (`host:port`, `host`); IPv6 hosts keep brackets
/// in the first and lose them in the second.
fn parse_server(url: &str) -> Result<(String, String), KubeconfigProblem> {
    let rest = url.strip_prefix("https://").ok_or_else(|| KubeconfigProblem::NotHttps(url.to_owned()))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) =
            v6.split_once(']').ok_or_else(|| KubeconfigProblem::UnclosedBracket(url.to_owned()))?;
        (h.to_owned(), after.strip_prefix(':').unwrap_or("443").to_owned())
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.to_owned()),
            None => (authority.to_owned(), "443".to_owned()),
        }
    };
    let port: u16 =
        port.parse().map_err(|_| KubeconfigProblem::BadPort { url: url.to_owned(), port: port.clone() })?;
    let hostport = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok((hostport, host))
}

/// Decodes standard base64 (with or without padding; whitespace ignored).
pub fn decode_base64(s: &str) -> Result<Vec<u8>, Base64Error> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(Base64Error(c as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_vectors() {
        for (enc, dec) in [
            ("", ""),
            ("Zg==", "f"),
            ("Zm8=", "fo"),
            ("Zm9v", "foo"),
            ("Zm9vYmFy", "foobar"),
            ("Zm9v\nYmE=", "fooba"),
        ] {
            assert_eq!(decode_base64(enc).unwrap(), dec.as_bytes(), "{enc}");
        }
        assert!(decode_base64("Zm9v!").is_err());
    }

    #[test]
    fn parses_server_urls() {
        assert_eq!(
            parse_server("https://127.0.0.1:6444").unwrap(),
            ("127.0.0.1:6444".into(), "127.0.0.1".into())
        );
        assert_eq!(
            parse_server("https://[fd00::1]:6443/").unwrap(),
            ("[fd00::1]:6443".into(), "fd00::1".into())
        );
        assert_eq!(
            parse_server("https://api.example.com").unwrap(),
            ("api.example.com:443".into(), "api.example.com".into())
        );
        assert!(parse_server("http://x:1").is_err());
    }
}
