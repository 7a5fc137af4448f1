//! `apilb probe`: the health check, run from Rust with the same CA, SNI and
//! credential HAProxy uses, step by step, with a diagnosis in plain words.
//!
//! Each step is reported: TCP connect time; the TLS handshake with the
//! server certificate's subject, names and expiry (captured even when
//! verification fails); the HTTP status; on failure the `/readyz?verbose`
//! body. A credential is never sent to a server whose certificate failed
//! verification: the handshake fails first.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;

/// The most of an answer `probe` reads: `/readyz?verbose` is a few hundred
/// bytes.
const PROBE_BODY_LIMIT: usize = 64 << 10;
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::CertificateError;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::{Config, Master};
use crate::inputs::{Credential, Inputs, Verify};
use crate::tls::{self, RecordingVerifier, ServerVerification};

/// The server certificate as seen during the handshake.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject DN.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// SANs, as `DNS:name` / `IP:addr`.
    pub names: Vec<String>,
    /// Expiry, human-readable.
    pub not_after: String,
    /// Seconds until expiry (negative when expired).
    pub expires_in_s: i64,
}

/// How one step ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// It worked; the text says how.
    Ok(String),
    /// It failed; the text says how.
    Failed(String),
    /// Not attempted because an earlier step failed.
    Skipped,
}

/// The result of probing one master.
#[derive(Clone, Debug)]
pub struct Report {
    /// The master's name.
    pub name: String,
    /// Its address.
    pub address: String,
    /// TCP connect.
    pub tcp: Step,
    /// TLS handshake.
    pub tls: Step,
    /// The server's certificate, when one was received.
    pub cert: Option<CertInfo>,
    /// The credential presented.
    pub auth: String,
    /// The HTTP request.
    pub http: Step,
    /// HTTP status, when one was received.
    pub status: Option<u16>,
    /// `/readyz?verbose` body on failure.
    pub verbose: Option<String>,
    /// What is wrong and what to do, in words.
    pub diagnosis: Vec<String>,
    /// True when the check would pass.
    pub ok: bool,
}

/// Parses the parts of a certificate an operator needs.
pub fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push(format!("DNS:{d}")),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    names.push(format!("IP:{}", ip.unwrap_or_else(|| "?".into())));
                }
                _ => {}
            }
        }
    }
    let not_after = cert.validity().not_after;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Some(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        names,
        not_after: not_after.to_string(),
        expires_in_s: not_after.timestamp() - now,
    })
}

/// The TLS client configuration HAProxy's check uses (same CA, same
/// client certificate; server verification as configured), for apilb's
/// own checker ([`crate::check`]).
pub fn check_client_config(inputs: &Inputs) -> Result<Arc<rustls::ClientConfig>, String> {
    client_config(inputs).map(|(config, _)| config)
}

/// The TLS client the check uses: same CA, same client certificate. The
/// verifier records the server's certificate, verified or not.
fn client_config(inputs: &Inputs) -> Result<(Arc<rustls::ClientConfig>, Arc<RecordingVerifier>), String> {
    let provider = tls::provider();
    let inner = match &inputs.check.verify {
        Verify::Ca { path, .. } => {
            let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let roots = tls::roots(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(tls::verifier(roots, provider.clone()).map_err(|e| e.to_string())?)
        }
        Verify::Insecure | Verify::BootstrapNoCa => None,
    };
    let recorder = Arc::new(RecordingVerifier::new(inner, provider.clone()));
    let client = match &inputs.check.credential {
        Credential::ClientCert { bundle, .. } => {
            let pem = bundle.expose().as_bytes();
            Some(tls::ClientCert { chain_pem: pem, key_pem: pem })
        }
        _ => None,
    };
    let config = tls::client_config(provider, ServerVerification::Custom(recorder.clone()), client)
        .map_err(|e| e.to_string())?;
    Ok((Arc::new(config), recorder))
}

/// An AuthenticationConfiguration that allows anonymous requests to the
/// health endpoints only (Kubernetes 1.34+, recent k3s).
pub const ANONYMOUS_HEALTH_CONFIG: &str = "\
      apiVersion: apiserver.config.k8s.io/v1beta1   # v1 on Kubernetes 1.34+
      kind: AuthenticationConfiguration
      anonymous:
        enabled: true
        conditions:
        - path: /livez
        - path: /readyz
        - path: /healthz
    (kube-apiserver --authentication-config=FILE, without --anonymous-auth;
     k3s: kube-apiserver-arg: authentication-config=FILE)";

/// Probes every master, or those named (by name or address).
pub async fn probe_all(config: &Config, inputs: &Inputs, only: &[String]) -> Result<Vec<Report>, String> {
    let masters: Vec<&Master> = if only.is_empty() {
        config.masters.iter().collect()
    } else {
        let mut picked = Vec::new();
        for want in only {
            let m = config
                .masters
                .iter()
                .find(|m| &m.name == want || &m.address.to_string() == want)
                .ok_or_else(|| {
                    let names: Vec<&str> = config.masters.iter().map(|m| m.name.as_str()).collect();
                    format!("no master named {want:?}; the config has: {}", names.join(", "))
                })?;
            picked.push(m);
        }
        picked
    };
    let mut reports = Vec::with_capacity(masters.len());
    for m in masters {
        reports.push(probe(config, inputs, m).await);
    }
    Ok(reports)
}

/// Probes one master: TCP, then TLS, then HTTP, each step only if the one
/// before it worked.
pub async fn probe(config: &Config, inputs: &Inputs, master: &Master) -> Report {
    let h = &config.health;
    let mut r = Report {
        name: master.name.clone(),
        address: master.address.to_string(),
        tcp: Step::Skipped,
        tls: Step::Skipped,
        cert: None,
        auth: format!("{} ({})", inputs.check.mode_in_use(), inputs.check.source),
        http: Step::Skipped,
        status: None,
        verbose: None,
        diagnosis: Vec::new(),
        ok: false,
    };
    // The same limits HAProxy applies: connect within min(timeout connect,
    // interval), then TLS and HTTP within the check timeout.
    let connect_limit = config.timeouts.connect.std().min(h.interval.std());
    let check_limit = h.timeout.std();
    let Some(tcp) = connect(&mut r, master, connect_limit).await else { return r };
    let Some(tls) = handshake(&mut r, config, inputs, tcp, check_limit).await else { return r };
    request(&mut r, config, inputs, tls, check_limit).await;
    r
}

/// The TLS stream the check runs over.
type CheckStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Resolves the master and connects within `connect_limit`; records the
/// step (and a diagnosis) in `r`.
async fn connect(r: &mut Report, master: &Master, connect_limit: Duration) -> Option<TcpStream> {
    let target = format!("{}:{}", master.address.host_str(), master.address.port);
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(&target).await {
        Ok(a) => a.collect(),
        Err(e) => {
            r.tcp = Step::Failed(format!("cannot resolve {}: {e}", master.address.host_str()));
            r.diagnosis.push(format!(
                "The name {} does not resolve on this node. Check DNS (/etc/resolv.conf) or use an IP address.",
                master.address.host_str()
            ));
            return None;
        }
    };
    let Some(&addr) = addrs.first() else {
        r.tcp = Step::Failed("the name resolved to no address".into());
        return None;
    };

    let started = Instant::now();
    match tokio::time::timeout(connect_limit, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            r.tcp = Step::Ok(format!("connected to {addr} in {}", ms(started.elapsed())));
            Some(s)
        }
        Ok(Err(e)) => {
            r.tcp = Step::Failed(format!("{addr}: {e}"));
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                r.diagnosis.push(format!(
                    "Connection refused: nothing listens on {addr}. The API server is down or restarting, or the port is wrong. \
                     HAProxy reports this as L4CON."
                ));
            } else {
                r.diagnosis.push(format!("Cannot connect to {addr}: {e}. Check routing and firewalls between this node and the master."));
            }
            None
        }
        Err(_) => {
            r.tcp = Step::Failed(format!("no answer within {}", ms(connect_limit)));
            r.diagnosis.push(format!(
                "Timeout: {addr} did not answer the TCP connection within {}. The host is down, a firewall drops the \
                 packets, or the address is wrong. HAProxy reports this as L4TOUT.",
                ms(connect_limit)
            ));
            None
        }
    }
}

/// The TLS handshake with the check's CA, SNI and client certificate,
/// within `check_limit`; records the step, the certificate seen (and a
/// diagnosis) in `r`.
async fn handshake(
    r: &mut Report,
    config: &Config,
    inputs: &Inputs,
    tcp: TcpStream,
    check_limit: Duration,
) -> Option<CheckStream> {
    let server_name = config.health.tls.server_name().to_owned();
    let (tls_config, recorder) = match client_config(inputs) {
        Ok(c) => c,
        Err(e) => {
            r.tls = Step::Failed(e.clone());
            r.diagnosis.push(format!("Cannot set up TLS with the configured files: {e}"));
            return None;
        }
    };
    let Ok(sni) = ServerName::try_from(server_name.clone()) else {
        r.tls = Step::Failed(format!("{server_name:?} is not a valid server name"));
        return None;
    };
    let tls_started = Instant::now();
    let handshake = tokio_rustls::TlsConnector::from(tls_config).connect(sni, tcp);
    let tls = tokio::time::timeout(check_limit, handshake).await;
    r.cert = recorder.seen().and_then(|c| cert_info(&c));
    match tls {
        Ok(Ok(s)) => {
            let version = s.get_ref().1.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            let how = match &inputs.check.verify {
                Verify::Ca { path, .. } => {
                    format!("verified against {} as {server_name:?}", path.display())
                }
                Verify::Insecure => "NOT verified (insecure_skip_verify)".to_owned(),
                Verify::BootstrapNoCa => "NOT verified (bootstrap: no CA found yet)".to_owned(),
            };
            r.tls = Step::Ok(format!("{how}, {version}, in {}", ms(tls_started.elapsed())));
            if let Some(c) = &r.cert
                && c.expires_in_s < 30 * 86400
                && c.expires_in_s > 0
            {
                r.diagnosis.push(format!(
                    "Warning: the server certificate expires in {} days.",
                    c.expires_in_s / 86400
                ));
            }
            Some(s)
        }
        Ok(Err(e)) => {
            let rustls_err = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()).cloned();
            r.tls =
                Step::Failed(rustls_err.as_ref().map(ToString::to_string).unwrap_or_else(|| e.to_string()));
            r.diagnosis.push(diagnose_tls(rustls_err.as_ref(), &e, config, inputs, r.cert.as_ref()));
            None
        }
        Err(_) => {
            r.tls = Step::Failed(format!("no TLS handshake within {}", ms(check_limit)));
            r.diagnosis.push(format!(
                "The master accepts TCP connections but does not complete a TLS handshake within {} (health.timeout): \
                 the API server process is stopped, hung or overloaded. HAProxy reports this as L6TOUT.",
                ms(check_limit)
            ));
            None
        }
    }
}

/// The check's request (and `?verbose` when it fails), within
/// `check_limit`; records the step, the status (and a diagnosis) in `r`.
async fn request(r: &mut Report, config: &Config, inputs: &Inputs, tls: CheckStream, check_limit: Duration) {
    let h = &config.health;
    let token = match &inputs.check.credential {
        Credential::Bearer { token, .. } => Some(token.expose().to_owned()),
        _ => None,
    };
    let http_started = Instant::now();
    let request = exchange(config, inputs, tls, token.as_deref());
    match tokio::time::timeout(check_limit, request).await {
        Ok(Ok((status, verbose))) => {
            r.status = Some(status);
            r.verbose = verbose;
            let line = format!("GET {} → {status} in {}", h.path, ms(http_started.elapsed()));
            if inputs.check.accepted_statuses(&config.health.expect_status).contains(&status) {
                r.http = Step::Ok(line);
                r.ok = true;
                if inputs.check.bootstrap && status != 200 {
                    r.diagnosis.push(format!(
                        "Bootstrap: {status} proves only that the API server answers, not that it is ready. apilb \
                         switches to authenticated checks when the node's credential appears."
                    ));
                }
            } else {
                r.http = Step::Failed(line);
                r.diagnosis.push(diagnose_status(status, inputs));
            }
        }
        Ok(Err(e)) => {
            r.http = Step::Failed(e.clone());
            r.diagnosis.push(format!("The HTTP exchange failed: {e}. HAProxy reports this as L7RSP."));
        }
        Err(_) => {
            r.http = Step::Failed(format!("no HTTP answer within {}", ms(check_limit)));
            r.diagnosis.push(format!(
                "TLS works but {} gets no answer within {} (health.timeout): the API server is overloaded or stuck. \
                 HAProxy reports this as L7TOUT.",
                h.path,
                ms(check_limit)
            ));
        }
    }
}

/// GET the health path with the credential; on a status that does not
/// count as alive, also `?verbose` for the diagnosis.
async fn exchange(
    config: &Config,
    inputs: &Inputs,
    tls: CheckStream,
    token: Option<&str>,
) -> Result<(u16, Option<String>), String> {
    let h = &config.health;
    let server_name = h.tls.server_name();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let get = |path: &str| {
        let mut req = Request::get(path).header("host", server_name);
        if let Some(t) = &token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())
    };
    let resp = sender.send_request(get(&h.path.0)?).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = crate::discovery::read_all(resp.into_body(), PROBE_BODY_LIMIT).await;
    let verbose = if inputs.check.accepted_statuses(&config.health.expect_status).contains(&status) {
        None
    } else {
        let path = if h.path.0.contains('?') {
            format!("{}&verbose", h.path.0)
        } else {
            format!("{}?verbose", h.path.0)
        };
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(get(&path)?).await.map_err(|e| e.to_string())?;
        // From the API: bounded, and escaped for the terminal.
        let body = crate::discovery::read_all(resp.into_body(), PROBE_BODY_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        Some(crate::sanitize::untrusted(&String::from_utf8_lossy(&body), 2000))
    };
    Ok((status, verbose))
}

fn diagnose_tls(
    err: Option<&rustls::Error>,
    io: &std::io::Error,
    config: &Config,
    inputs: &Inputs,
    cert: Option<&CertInfo>,
) -> String {
    let ca = match &inputs.check.verify {
        Verify::Ca { path, .. } => path.display().to_string(),
        _ => "(none)".to_owned(),
    };
    let names = cert.map(|c| c.names.join(", ")).unwrap_or_default();
    match err {
        Some(rustls::Error::InvalidCertificate(ce)) => match ce {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "Unknown CA: the server's certificate (issued by {}) is not signed by the CA in health.tls.ca_file ({ca}). \
                 Set health.tls.ca_file to the cluster's CA: on k3s /var/lib/rancher/k3s/agent/server-ca.crt (agents) or \
                 /var/lib/rancher/k3s/server/tls/server-ca.crt (servers); on kubeadm /etc/kubernetes/pki/ca.crt. \
                 HAProxy reports this as L6RSP.",
                cert.map(|c| c.issuer.as_str()).unwrap_or("an unknown issuer")
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                "Name mismatch: the certificate does not cover {:?}, the name apilb checks (health.tls.server_name). \
                 It covers: {names}. Set health.tls.server_name to one of its DNS names (every kubeadm, k3s and RKE2 \
                 API server certificate carries \"kubernetes\"). HAProxy reports this as L6RSP.",
                config.health.tls.server_name()
            ),
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => format!(
                "Expired certificate: the server's certificate expired ({}). Renew it on the master, and check the \
                 clocks (timedatectl) on both sides.",
                cert.map(|c| c.not_after.as_str()).unwrap_or("date unknown")
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "The server's certificate is not valid yet: one of the clocks is wrong (timedatectl)."
                    .to_owned()
            }
            other => format!("The server's certificate was refused: {other:?}."),
        },
        Some(rustls::Error::AlertReceived(alert)) => format!(
            "The server ended the handshake ({alert:?}). If it requires a client certificate, use \
             health.auth.mode client_cert or auto; if it refused ours, the certificate is not signed by the \
             cluster's client CA."
        ),
        Some(other) => format!("The TLS handshake failed: {other}."),
        None => format!("The TLS handshake failed: {io}."),
    }
}

fn diagnose_status(status: u16, inputs: &Inputs) -> String {
    let sent = inputs.check.credential.kind();
    match status {
        401 if sent == "none" => format!(
            "401 Unauthorized: the API server has anonymous auth off (k3s's default and that of hardened clusters), so \
             an anonymous /readyz proves nothing. Give the check a credential:\n\
             \x20 - health.auth.mode: client_cert, with the node's kubelet client certificate (cert_file, key_file);\n\
             \x20 - health.auth.mode: bearer, with a service-account token (token_file);\n\
             \x20 - health.auth.mode: auto, which finds the kubelet certificate of k3s, RKE2 and kubeadm nodes;\n\
             \x20 - or allow anonymous requests to the health endpoints only, on the API servers:\n{ANONYMOUS_HEALTH_CONFIG}"
        ),
        401 => format!(
            "401 Unauthorized: the API server rejected the {sent} credential. A client certificate must be signed by \
             the cluster's client CA and not expired; a token must be valid and not expired."
        ),
        403 => {
            "403 Forbidden: the credential is valid but may not read /readyz. Every authenticated user may \
                (system:public-info-viewer), unless that ClusterRole or its binding was changed."
                .to_owned()
        }
        404 => "404: health.path does not exist here; is this a Kubernetes API server?".to_owned(),
        500..=599 => format!(
            "{status}: the API server answers but is not ready: it is starting, shutting down gracefully, or lost \
             etcd. The verbose output below lists the failing checks. HAProxy reports this as L7STS."
        ),
        _ => format!("{status} is not among the expected statuses (health.expect_status)."),
    }
}

fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2}s", d.as_secs_f64())
    } else {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    }
}

/// The report as printed by `apilb probe`.
pub fn render(r: &Report) -> String {
    let mut out = format!("{} ({})\n", r.name, r.address);
    let step = |out: &mut String, label: &str, s: &Step| {
        let _ = match s {
            Step::Ok(t) => writeln!(out, "  {label:<7} {t}"),
            Step::Failed(t) => writeln!(out, "  {label:<7} FAILED: {t}"),
            Step::Skipped => Ok(()),
        };
    };
    step(&mut out, "tcp", &r.tcp);
    step(&mut out, "tls", &r.tls);
    if let Some(c) = &r.cert {
        let _ = writeln!(out, "          subject  {}", c.subject);
        let _ = writeln!(out, "          issuer   {}", c.issuer);
        let _ = writeln!(
            out,
            "          names    {}",
            if c.names.is_empty() { "(none)".into() } else { c.names.join(", ") }
        );
        let days = c.expires_in_s / 86400;
        let when = if c.expires_in_s < 0 {
            format!("EXPIRED {} days ago", -days)
        } else {
            format!("in {days} days")
        };
        let _ = writeln!(out, "          expires  {} ({when})", c.not_after);
    }
    if !matches!(r.tls, Step::Skipped) {
        let _ = writeln!(out, "  auth    {}", r.auth);
    }
    step(&mut out, "http", &r.http);
    if let Some(v) = &r.verbose {
        let _ = writeln!(out, "  verbose");
        for line in v.lines() {
            let _ = writeln!(out, "          {line}");
        }
    }
    for d in &r.diagnosis {
        let mut lines = d.lines();
        if let Some(first) = lines.next() {
            let _ = writeln!(out, "  why     {first}");
        }
        for l in lines {
            let _ = writeln!(out, "          {l}");
        }
    }
    let _ = writeln!(out, "  result  {}", if r.ok { "OK" } else { "FAILED" });
    out
}
