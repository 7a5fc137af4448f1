//! A stand-in Kubernetes API server speaking real TLS and HTTP/1.1, for
//! the demo (`scripts/demo`), the integration tests and the benchmarks.
//!
//! It answers `/readyz`, `/livez`, `/healthz` and `/version` like
//! kube-apiserver does (including 401 for anonymous requests when anonymous
//! auth is off), and it can be made to fail the ways real masters fail:
//!
//! - [`ApiServer::crash`]: the process is gone: connections are closed and
//!   new ones refused. [`ApiServer::restart`] brings it back on the same port.
//! - [`ApiServer::hang`]: the process is stopped (SIGSTOP): TCP connections
//!   are accepted by the kernel, but nothing is ever answered.
//! - [`ApiServer::set_readyz`]: `/readyz` answers 500/503 while TCP and TLS
//!   work (etcd trouble, graceful shutdown).
//!
//! [`Pki`] makes the certificates; [`Load`] keeps clients connecting
//! through a load balancer and counts failures.

pub mod cluster;
pub mod pool;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use cluster::{Cluster, ClusterCounts};

/// Errors setting up test servers or clients.
#[derive(Debug, thiserror::Error)]
pub enum TestApiError {
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    /// TLS configuration was refused.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A socket operation failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// PEM or client-verifier setup failed.
    #[error("{0}")]
    Setup(String),
}

/// A throw-away certificate authority.
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct CertPair {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PEM).
    pub key_pem: String,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Pki, TestApiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Pki { ca })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A serving certificate for `sans` (DNS names or IPs).
    pub fn server_cert(&self, cn: &str, sans: &[&str]) -> Result<CertPair, TestApiError> {
        self.issue(cn, &[], sans, ExtendedKeyUsagePurpose::ServerAuth, false)
    }

    /// A serving certificate that expired in 2001.
    pub fn expired_server_cert(&self, cn: &str, sans: &[&str]) -> Result<CertPair, TestApiError> {
        self.issue(cn, &[], sans, ExtendedKeyUsagePurpose::ServerAuth, true)
    }

    /// A client certificate, e.g. CN `system:node:n1`, O `system:nodes`.
    pub fn client_cert(&self, cn: &str, orgs: &[&str]) -> Result<CertPair, TestApiError> {
        self.issue(cn, orgs, &[], ExtendedKeyUsagePurpose::ClientAuth, false)
    }

    fn issue(
        &self,
        cn: &str,
        orgs: &[&str],
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> Result<CertPair, TestApiError> {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        for o in orgs {
            dn.push(DnType::OrganizationName, *o);
        }
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        // Like every real cluster's certificates (kubeadm, k3s): strict
        // verifiers (Python 3.13's default, RFC 5280) require it.
        params.use_authority_key_identifier_extension = true;
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        } else {
            // Valid for a year from yesterday, like a real cluster's certs.
            let (y, m, d) = civil_today();
            params.not_before = rcgen::date_time_ymd(y, m, d.saturating_sub(1).max(1));
            params.not_after = rcgen::date_time_ymd(y + 1, m, d);
        }
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Today's UTC date (year, month, day), from the Unix clock.
fn civil_today() -> (i32, u8, u8) {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    // Howard Hinnant's days-to-civil algorithm.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    // Day 29-31 does not exist in every month of next year; stay safe.
    (y, m, d.min(28))
}

/// Who may call `/readyz`, `/version` and the other endpoints.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    /// Anonymous requests succeed (kube-apiserver `--anonymous-auth=true`
    /// or an AuthenticationConfiguration allowing /readyz).
    pub anonymous: bool,
    /// Bearer tokens accepted.
    pub tokens: Vec<String>,
    /// CA whose client certificates are accepted.
    pub client_ca_pem: Option<String>,
}

/// How to start an [`ApiServer`].
#[derive(Clone, Debug)]
pub struct ApiServerOptions {
    /// Reported by `/version` as `apilbServer`, so a client knows which
    /// master served it.
    pub name: String,
    /// Serving certificate.
    pub cert: CertPair,
    /// Who is allowed in.
    pub auth: Auth,
    /// Address to bind; port 0 picks a free one.
    pub bind: SocketAddr,
    /// The cluster whose endpoints this server serves (list and watch).
    pub cluster: Option<Arc<Cluster>>,
}

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ApiStats {
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// TCP connections currently open.
    pub open: AtomicU64,
    /// `/readyz` requests answered.
    pub readyz: AtomicU64,
    /// Requests refused with 401.
    pub unauthorized: AtomicU64,
    /// Requests authenticated by bearer token.
    pub by_token: AtomicU64,
    /// Requests authenticated by client certificate.
    pub by_cert: AtomicU64,
}

/// Pauses I/O of every connection of a server, like SIGSTOP does.
#[derive(Default)]
struct Freeze {
    frozen: AtomicBool,
    wakers: Mutex<Vec<Waker>>,
}

impl Freeze {
    fn set(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
        if !frozen {
            let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
            wakers.into_iter().for_each(Waker::wake);
        }
    }
    /// Pending (and remembered) while frozen.
    fn poll_thawed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.frozen.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        self.wakers.lock().unwrap_or_else(|e| e.into_inner()).push(cx.waker().clone());
        // Re-check: `set(false)` may have run between the load and the push.
        if self.frozen.load(Ordering::SeqCst) { Poll::Pending } else { Poll::Ready(()) }
    }
    async fn thawed(&self) {
        std::future::poll_fn(|cx| self.poll_thawed(cx)).await
    }
}

/// A TCP stream whose I/O stops while its server is frozen.
struct Gated {
    inner: TcpStream,
    freeze: Arc<Freeze>,
    sockets: Arc<Sockets>,
}

impl Drop for Gated {
    fn drop(&mut self) {
        // Unregistered before the socket closes (fields drop after this),
        // so `crash` never shuts down a reused descriptor number.
        self.sockets.remove(self.inner.as_raw_fd());
    }
}

/// The descriptors of a server's listener and connections, so `crash` can
/// close them all at once, as the kernel does when a process dies.
#[derive(Default)]
struct Sockets(Mutex<std::collections::HashSet<RawFd>>);

impl Sockets {
    fn add(&self, fd: RawFd) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(fd);
    }
    fn remove(&self, fd: RawFd) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&fd);
    }
    /// shutdown(2) on every registered socket: new connections are refused
    /// and established ones see their peer vanish, synchronously.
    fn shutdown_all(&self) {
        let mut set = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for fd in set.drain() {
            // SAFETY: every registered fd is open: it is removed (under
            // this lock) before its owner closes it.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }
}

impl AsyncRead for Gated {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.freeze.poll_thawed(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.freeze.poll_thawed(cx).is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

struct Shared {
    name: String,
    auth: Auth,
    readyz: AtomicU16,
    freeze: Arc<Freeze>,
    stats: ApiStats,
    tls: Arc<rustls::ServerConfig>,
    sockets: Arc<Sockets>,
    cluster: Option<Arc<Cluster>>,
}

impl Shared {
    fn new(opts: ApiServerOptions) -> Result<Arc<Shared>, TestApiError> {
        let tls = server_tls(&opts.cert, opts.auth.client_ca_pem.as_deref())?;
        Ok(Arc::new(Shared {
            name: opts.name,
            auth: opts.auth,
            readyz: AtomicU16::new(200),
            freeze: Arc::default(),
            stats: ApiStats::default(),
            tls: Arc::new(tls),
            sockets: Arc::default(),
            cluster: opts.cluster,
        }))
    }
}

/// A running test API server. Dropping it stops it.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl ApiServer {
    /// Binds and starts serving.
    pub async fn start(opts: ApiServerOptions) -> Result<ApiServer, TestApiError> {
        let bind = opts.bind;
        let shared = Shared::new(opts)?;
        Self::serve_on(TcpListener::bind(bind).await?, shared)
    }

    /// Starts serving on a listener bound elsewhere (`opts.bind` is
    /// ignored): the benchmarks bind one inside a network namespace, where
    /// it can be black-holed. [`ApiServer::restart`] rebinds its address
    /// in the caller's namespace, so it is not for such servers.
    pub fn start_on(
        listener: std::net::TcpListener,
        opts: ApiServerOptions,
    ) -> Result<ApiServer, TestApiError> {
        let shared = Shared::new(opts)?;
        listener.set_nonblocking(true)?;
        Self::serve_on(TcpListener::from_std(listener)?, shared)
    }

    fn serve_on(listener: TcpListener, shared: Arc<Shared>) -> Result<ApiServer, TestApiError> {
        let addr = listener.local_addr()?;
        let task = spawn_serve(listener, shared.clone());
        Ok(ApiServer { shared, addr, task: Mutex::new(Some(task)) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its name (what `/version` reports as `apilbServer`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its counters.
    pub fn stats(&self) -> &ApiStats {
        &self.shared.stats
    }

    /// Makes `/readyz` answer `status` (200 for healthy).
    pub fn set_readyz(&self, status: u16) {
        self.shared.readyz.store(status, Ordering::SeqCst);
    }

    /// Like SIGKILL: closes every connection and stops listening.
    pub fn crash(&self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Close everything now; the aborted task frees the rest later.
            self.shared.sockets.shutdown_all();
            task.abort();
        }
        self.shared.freeze.set(false);
    }

    /// Comes back on the same address after [`ApiServer::crash`].
    pub async fn restart(&self) -> Result<(), TestApiError> {
        self.crash();
        let listener = TcpListener::bind(self.addr).await?;
        let task = spawn_serve(listener, self.shared.clone());
        *self.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        Ok(())
    }

    /// Like SIGSTOP: connections are still accepted by the kernel, but
    /// nothing is read or answered.
    pub fn hang(&self) {
        self.shared.freeze.set(true);
    }

    /// Like SIGCONT after [`ApiServer::hang`].
    pub fn resume(&self) {
        self.shared.freeze.set(false);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.crash();
    }
}

fn server_tls(cert: &CertPair, client_ca: Option<&str>) -> Result<rustls::ServerConfig, TestApiError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TestApiError::Setup(format!("server certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| TestApiError::Setup(format!("server key: {e}")))?;
    let builder = rustls::ServerConfig::builder();
    let mut config = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| TestApiError::Setup(format!("client CA: {e}")))?;
                roots.add(c)?;
            }
            // Like kube-apiserver: a client certificate is verified when
            // presented, but anonymous and token clients may connect too.
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|e| TestApiError::Setup(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier).with_single_cert(chain, key)?
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key)?,
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Registers the listener's descriptor for `crash` and serves on it.
fn spawn_serve(listener: TcpListener, shared: Arc<Shared>) -> JoinHandle<()> {
    shared.sockets.add(listener.as_raw_fd());
    tokio::spawn(serve(listener, shared))
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    // Unregister the listener before it closes, whenever this task ends.
    struct Unregister(Arc<Sockets>, RawFd);
    impl Drop for Unregister {
        fn drop(&mut self) {
            self.0.remove(self.1);
        }
    }
    let _unregister = Unregister(shared.sockets.clone(), listener.as_raw_fd());
    let listener = listener;
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls.clone());
    // Dropping the set (when this task is aborted) aborts every connection.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        // A stopped process does not call accept(); the kernel still
        // completes handshakes into the backlog.
        shared.freeze.thawed().await;
        let accepted = tokio::select! {
            a = listener.accept() => a,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((tcp, _)) = accepted else { continue };
        // Like kube-apiserver (Go sets TCP_NODELAY): no Nagle delay on
        // small responses.
        let _ = tcp.set_nodelay(true);
        shared.sockets.add(tcp.as_raw_fd());
        shared.stats.connections.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        conns.spawn(async move {
            shared.stats.open.fetch_add(1, Ordering::SeqCst);
            let _open = scopeguard(&shared);
            let gated = Gated { inner: tcp, freeze: shared.freeze.clone(), sockets: shared.sockets.clone() };
            let Ok(tls) = acceptor.accept(gated).await else {
                return;
            };
            let by_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
            let svc_shared = shared.clone();
            let service = hyper::service::service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, by_cert, req)) }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

/// Decrements the open-connection count when a connection task ends,
/// including when it is aborted.
fn scopeguard(shared: &Arc<Shared>) -> impl Drop + use<> {
    struct Guard(Arc<Shared>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.stats.open.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Guard(shared.clone())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<cluster::Body> {
    cluster::plain(status, body)
}

fn handle(shared: &Shared, by_cert: bool, req: Request<hyper::body::Incoming>) -> Response<cluster::Body> {
    let token = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let by_token = token.is_some_and(|t| shared.auth.tokens.iter().any(|ok| ok == t));
    if by_token {
        shared.stats.by_token.fetch_add(1, Ordering::SeqCst);
    } else if by_cert {
        shared.stats.by_cert.fetch_add(1, Ordering::SeqCst);
    } else if !shared.auth.anonymous {
        shared.stats.unauthorized.fetch_add(1, Ordering::SeqCst);
        return text(
            StatusCode::UNAUTHORIZED,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#,
        );
    }
    let verbose = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "verbose"));
    if let Some(c) = &shared.cluster
        && let Some(resp) = c.serve(req.uri().path(), req.uri().query().unwrap_or(""))
    {
        return resp;
    }
    match req.uri().path() {
        "/readyz" => {
            shared.stats.readyz.fetch_add(1, Ordering::SeqCst);
            let status = shared.readyz.load(Ordering::SeqCst);
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let body = match (code.is_success(), verbose) {
                (true, false) => "ok".to_owned(),
                (true, true) => "[+]ping ok\n[+]log ok\n[+]etcd ok\n[+]informer-sync ok\nreadyz check passed\n".into(),
                (false, _) => "[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n[+]informer-sync ok\nreadyz check failed\n".into(),
            };
            text(code, body)
        }
        "/livez" | "/healthz" => text(StatusCode::OK, "ok"),
        "/version" => text(
            StatusCode::OK,
            format!(
                r#"{{"major":"1","minor":"31","gitVersion":"v1.31.0+apilb-test","platform":"linux/amd64","apilbServer":"{}"}}"#,
                shared.name
            ),
        ),
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

/// TLS settings for clients of the test servers.
pub fn client_tls(
    ca_pem: &str,
    client: Option<&CertPair>,
) -> Result<Arc<rustls::ClientConfig>, TestApiError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.map_err(|e| TestApiError::Setup(format!("CA: {e}")))?)?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        Some(pair) => {
            let chain = CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TestApiError::Setup(format!("client cert: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())
                .map_err(|e| TestApiError::Setup(format!("client key: {e}")))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// An HTTP/1.1-over-TLS connection to a test server (directly or through a
/// load balancer), kept open to model a long-lived client such as a watch.
pub struct Session {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    token: Option<String>,
    /// Completes when the connection is closed by either side.
    closed: watch::Receiver<bool>,
}

impl Session {
    /// Connects, handshakes (SNI `kubernetes`) and returns the session.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: Option<&str>,
    ) -> Result<Session, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("kubernetes").map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        let (tx, closed) = watch::channel(false);
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = tx.send(true);
        });
        Ok(Session { sender, token: token.map(str::to_owned), closed })
    }

    /// `GET path`; returns the status and body.
    pub async fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.sender.ready().await.map_err(|e| format!("connection: {e}"))?;
        let mut req = Request::get(path).header("host", "kubernetes");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = self.sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Which server answered `/version` on this session.
    pub async fn served_by(&mut self) -> Result<String, String> {
        let (status, body) = self.get("/version").await?;
        if status != 200 {
            return Err(format!("/version answered {status}: {body}"));
        }
        server_name_of(&body).ok_or_else(|| format!("no apilbServer in {body}"))
    }

    /// True once the connection has been closed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits until the connection is closed, at most `limit`.
    pub async fn wait_closed(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.closed.wait_for(|c| *c)).await.is_ok()
    }
}

fn server_name_of(version_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(version_json).ok()?;
    v.get("apilbServer")?.as_str().map(str::to_owned)
}

/// One failed attempt of a [`Load`] client.
#[derive(Debug, Clone)]
pub struct Failure {
    /// When the attempt started.
    pub started: Instant,
    /// When it failed.
    pub ended: Instant,
    /// Why.
    pub error: String,
}

/// Outcome of a [`Load`] run.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests that completed with 200.
    pub ok: u64,
    /// Requests that failed.
    pub failed: u64,
    /// The first failures, for diagnosis.
    pub errors: Vec<String>,
    /// Every failure with its timing (the first 1000).
    pub failures: Vec<Failure>,
    /// Successful requests per serving master.
    pub by_server: HashMap<String, u64>,
    /// Every successful attempt (the first 200,000), for
    /// [`LoadReport::ok_since`] and [`LoadReport::slowest_since`].
    pub successes: Vec<Success>,
}

/// One successful attempt of a [`Load`] client.
#[derive(Debug, Clone)]
pub struct Success {
    /// When the attempt started.
    pub started: Instant,
    /// How long it took, from connecting to the answer.
    pub took: Duration,
    /// The master that answered.
    pub server: String,
}

impl LoadReport {
    /// Waits for every client task and adds up their reports (a task that
    /// panicked counts nothing).
    pub async fn sum(tasks: Vec<tokio::task::JoinHandle<LoadReport>>) -> LoadReport {
        let mut total = LoadReport::default();
        for t in tasks {
            if let Ok(r) = t.await {
                total.merge(r);
            }
        }
        total
    }

    /// Adds another client's report to this one.
    pub fn merge(&mut self, r: LoadReport) {
        self.ok += r.ok;
        self.failed += r.failed;
        self.errors.extend(r.errors);
        self.failures.extend(r.failures);
        self.successes.extend(r.successes);
        for (k, v) in r.by_server {
            *self.by_server.entry(k).or_default() += v;
        }
    }

    /// Failures of attempts that started at or after `t`.
    pub fn failed_since(&self, t: Instant) -> Vec<&Failure> {
        self.failures.iter().filter(|f| f.started >= t).collect()
    }
    /// Failures of attempts in flight at `t` (started before, ended after).
    pub fn cut_at(&self, t: Instant) -> Vec<&Failure> {
        self.failures.iter().filter(|f| f.started < t && f.ended >= t).collect()
    }
    /// Successful attempts that started at or after `t`, by server.
    pub fn ok_since(&self, t: Instant) -> HashMap<String, u64> {
        let mut m = HashMap::new();
        for s in self.successes.iter().filter(|s| s.started >= t) {
            *m.entry(s.server.clone()).or_default() += 1;
        }
        m
    }
    /// The longest an attempt that started at or after `t` waited for its
    /// outcome, success or failure.
    pub fn slowest_since(&self, t: Instant) -> Duration {
        let ok = self.successes.iter().filter(|s| s.started >= t).map(|s| s.took);
        let failed = self.failed_since(t).into_iter().map(|f| f.ended.duration_since(f.started));
        ok.chain(failed).max().unwrap_or_default()
    }
}

/// Clients opening a new connection for every request, continuously, as
/// kubelets and controllers reconnecting would.
pub struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts `clients` loops against `addr`.
    pub fn start(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        token: Option<String>,
        clients: usize,
    ) -> Load {
        let (stop, rx) = watch::channel(false);
        let tasks = (0..clients)
            .map(|_| {
                let (tls, token, rx) = (tls.clone(), token.clone(), rx.clone());
                tokio::spawn(async move {
                    let mut report = LoadReport::default();
                    while !*rx.borrow() {
                        let started = Instant::now();
                        let outcome = tokio::time::timeout(Duration::from_secs(30), async {
                            let mut s = Session::connect(addr, tls.clone(), token.as_deref()).await?;
                            s.served_by().await
                        })
                        .await
                        .unwrap_or_else(|_| Err("no answer within 30s".into()));
                        match outcome {
                            Ok(server) => {
                                report.ok += 1;
                                *report.by_server.entry(server.clone()).or_default() += 1;
                                if report.successes.len() < 200_000 {
                                    report.successes.push(Success {
                                        started,
                                        took: started.elapsed(),
                                        server,
                                    });
                                }
                            }
                            Err(e) => {
                                report.failed += 1;
                                if report.errors.len() < 20 {
                                    report.errors.push(format!("{e} (after {:?})", started.elapsed()));
                                }
                                if report.failures.len() < 1000 {
                                    report.failures.push(Failure {
                                        started,
                                        ended: Instant::now(),
                                        error: e,
                                    });
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients and sums their reports.
    pub async fn stop(self) -> LoadReport {
        let _ = self.stop.send(true);
        LoadReport::sum(self.tasks).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::ParsedExtension;

    #[test]
    fn issued_certificates_name_their_issuers_key() {
        let pki = Pki::new("test CA").unwrap();
        let server = pki.server_cert("kube-apiserver", &["kubernetes", "127.0.0.1"]).unwrap();
        let client = pki.client_cert("system:node:n1", &["system:nodes"]).unwrap();
        for pair in [server, client] {
            let der = CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let aki = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.clone(),
                _ => None,
            });
            assert!(aki.is_some_and(|k| !k.0.is_empty()), "no authority key identifier");
        }
    }
}
