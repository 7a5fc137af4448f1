//! The parts of a kubeconfig apilb needs: the current context's server,
//! CA, client certificate or token. Relative paths are relative to the
//! kubeconfig's directory, as kubectl resolves them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::inputs::Secret;

/// A kubeconfig that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("kubeconfig {}: {problem}", path.display())]
pub struct KubeconfigError {
    /// The kubeconfig.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: String,
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
    pub fn server_addr(&self) -> Result<SocketAddr, String> {
        use std::net::ToSocketAddrs;
        self.server
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.server))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.server))
    }
}

/// Reads the kubeconfig at `path`.
pub fn load(path: &Path) -> Result<KubeAccess, KubeconfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KubeconfigError { path: path.to_owned(), problem: e.to_string() })?;
    parse(path, &text, &|p: &Path| std::fs::read(p))
}

/// Builds the access from the kubeconfig `text` found at `path`; `read`
/// reads the files it refers to (the only I/O).
pub fn parse(
    path: &Path,
    text: &str,
    read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<KubeAccess, KubeconfigError> {
    let err = |problem: String| KubeconfigError { path: path.to_owned(), problem };
    let raw: Raw = serde_yaml::from_str(text).map_err(|e| err(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("/"));
    let resolve = |p: &Path| if p.is_absolute() { p.to_owned() } else { base.join(p) };

    let context = if raw.current_context.is_empty() {
        raw.contexts.first()
    } else {
        raw.contexts.iter().find(|c| c.name == raw.current_context)
    }
    .ok_or_else(|| err(format!("no context {:?}", raw.current_context)))?;
    let cluster = raw
        .clusters
        .iter()
        .find(|c| c.name == context.context.cluster)
        .map(|c| &c.cluster)
        .ok_or_else(|| err(format!("no cluster {:?}", context.context.cluster)))?;
    let user = raw.users.iter().find(|u| u.name == context.context.user).map(|u| &u.user);

    let (server, server_host) = parse_server(&cluster.server).map_err(err)?;

    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?;
    let builder = if cluster.insecure {
        builder.dangerous().with_custom_certificate_verifier(crate::probe::accept_any_certificate(provider))
    } else {
        let ca_pem = match (&cluster.ca_data, &cluster.ca_file) {
            (Some(data), _) => {
                decode_base64(data).map_err(|e| err(format!("certificate-authority-data: {e}")))?
            }
            (None, Some(file)) => read(&resolve(file))
                .map_err(|e| err(format!("certificate-authority {}: {e}", resolve(file).display())))?,
            (None, None) => return Err(err("the cluster has no certificate-authority".into())),
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(c.map_err(|e| err(format!("CA: {e}")))?).map_err(|e| err(format!("CA: {e}")))?;
        }
        if roots.is_empty() {
            return Err(err("the CA holds no certificate".into()));
        }
        builder.with_root_certificates(roots)
    };

    let read_pem = |data: &Option<String>,
                    file: &Option<PathBuf>,
                    what: &str|
     -> Result<Option<Vec<u8>>, KubeconfigError> {
        match (data, file) {
            (Some(d), _) => decode_base64(d).map(Some).map_err(|e| err(format!("{what}-data: {e}"))),
            (None, Some(f)) => {
                read(&resolve(f)).map(Some).map_err(|e| err(format!("{what} {}: {e}", resolve(f).display())))
            }
            (None, None) => Ok(None),
        }
    };
    let (mut auth, mut token) = ("none", None);
    let tls = match user {
        Some(u) => {
            let cert = read_pem(&u.cert_data, &u.cert_file, "client-certificate")?;
            let key = read_pem(&u.key_data, &u.key_file, "client-key")?;
            if let Some(t) = &u.token {
                token = Some(Secret::new(t.trim()));
            } else if let Some(f) = &u.token_file {
                let t = read(&resolve(f))
                    .and_then(|b| {
                        String::from_utf8(b).map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "stream did not contain valid UTF-8",
                            )
                        })
                    })
                    .map_err(|e| err(format!("tokenFile: {e}")))?;
                token = Some(Secret::new(t.trim()));
            }
            if token.is_some() {
                auth = "bearer";
            }
            match (cert, key) {
                (Some(cert), Some(key)) => {
                    let chain = CertificateDer::pem_slice_iter(&cert)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| err(format!("client certificate: {e}")))?;
                    let key =
                        PrivateKeyDer::from_pem_slice(&key).map_err(|e| err(format!("client key: {e}")))?;
                    auth = "client_cert";
                    builder.with_client_auth_cert(chain, key).map_err(|e| err(e.to_string()))?
                }
                _ => builder.with_no_client_auth(),
            }
        }
        None => builder.with_no_client_auth(),
    };
    if auth == "none" {
        return Err(err("the user has no client certificate or token".into()));
    }
    Ok(KubeAccess {
        path: path.to_owned(),
        server,
        server_host,
        tls_server_name: cluster.tls_server_name.clone(),
        tls: Arc::new(tls),
        token,
        auth,
        insecure: cluster.insecure,
    })
}

/// `https://host:port` → (`host:port`, `host`); IPv6 hosts keep brackets
/// in the first and lose them in the second.
fn parse_server(url: &str) -> Result<(String, String), String> {
    let rest =
        url.strip_prefix("https://").ok_or_else(|| format!("server {url:?} is not an https:// URL"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("server {url:?}: unclosed '['"))?;
        (h.to_owned(), after.strip_prefix(':').unwrap_or("443").to_owned())
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.to_owned()),
            None => (authority.to_owned(), "443".to_owned()),
        }
    };
    let port: u16 = port.parse().map_err(|_| format!("server {url:?}: bad port {port:?}"))?;
    let hostport = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    Ok((hostport, host))
}

/// Decodes standard base64 (with or without padding; whitespace ignored).
pub fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
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
            _ => return Err(format!("invalid base64 character {:?}", c as char)),
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
