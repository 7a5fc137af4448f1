//! The TLS clients apilb builds: discovery's connection to the API (from a
//! kubeconfig) and `apilb probe`'s health check (from the check's inputs).
//!
//! Both take the same crypto provider, the safe default protocol versions,
//! roots from a CA's PEM, an optional client certificate, and either real
//! verification or the explicit opt-out (`insecure_skip_verify`,
//! `insecure-skip-tls-verify`). Neither sets ALPN. The callers word their
//! own errors: [`TlsError`] displays the underlying problem alone.

use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a TLS client could not be built. Each variant displays the
/// underlying error only; the caller says which file or field it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The crypto provider supports none of the safe default protocol
    /// versions.
    #[error("{0}")]
    Protocols(#[source] rustls::Error),
    /// A block of the CA's PEM could not be decoded.
    #[error("{0}")]
    CaPem(#[source] pem::Error),
    /// A certificate of the CA was refused as a trust anchor.
    #[error("{0}")]
    CaCertificate(#[source] rustls::Error),
    /// The certificate verifier could not be built from the roots (e.g.
    /// there are none).
    #[error("{0}")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    /// The client certificate chain's PEM could not be decoded.
    #[error("{0}")]
    ClientChain(#[source] pem::Error),
    /// The client key's PEM could not be decoded or holds no key.
    #[error("{0}")]
    ClientKey(#[source] pem::Error),
    /// rustls refused the client certificate and key (e.g. they do not
    /// match).
    #[error("{0}")]
    ClientAuth(#[source] rustls::Error),
}

/// The process's default crypto provider, or ring's when none is installed.
pub fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The trust anchors in a CA's PEM (possibly none: callers that need one
/// check [`RootCertStore::is_empty`]).
pub fn roots(ca_pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.map_err(TlsError::CaPem)?).map_err(TlsError::CaCertificate)?;
    }
    Ok(roots)
}

/// The standard WebPKI verifier (chain to `roots`, name, validity).
pub fn verifier(
    roots: RootCertStore,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(TlsError::Verifier)
}

/// How a client verifies the server.
pub enum ServerVerification {
    /// Standard verification against these roots.
    Roots(RootCertStore),
    /// A custom verifier: [`RecordingVerifier`] (which may verify or not),
    /// or [`accept_any_certificate`] when the user opted out.
    Custom(Arc<dyn ServerCertVerifier>),
}

/// A client certificate and its key, both PEM (they may be one bundle).
pub struct ClientCert<'a> {
    /// The certificate chain, leaf first.
    pub chain_pem: &'a [u8],
    /// The private key.
    pub key_pem: &'a [u8],
}

/// A client config with `provider`'s safe default protocol versions, the
/// given verification and, if any, a client certificate.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    verification: ServerVerification,
    client: Option<ClientCert<'_>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Protocols)?;
    let builder = match verification {
        ServerVerification::Roots(roots) => builder.with_root_certificates(roots),
        ServerVerification::Custom(v) => builder.dangerous().with_custom_certificate_verifier(v),
    };
    match client {
        Some(c) => {
            let chain = CertificateDer::pem_slice_iter(c.chain_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(TlsError::ClientChain)?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem).map_err(TlsError::ClientKey)?;
            builder.with_client_auth_cert(chain, key).map_err(TlsError::ClientAuth)
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// A verifier that accepts any server certificate, for configurations that
/// explicitly opt out of verification (`insecure-skip-tls-verify`).
pub fn accept_any_certificate(provider: Arc<CryptoProvider>) -> Arc<dyn ServerCertVerifier> {
    Arc::new(RecordingVerifier::new(None, provider))
}

/// Records the certificate the server presented, then lets the real
/// verifier decide (or accepts anything when verification is off): `probe`
/// shows the certificate even when verification fails.
#[derive(Debug)]
pub struct RecordingVerifier {
    /// The real verifier; `None` accepts any certificate.
    inner: Option<Arc<WebPkiServerVerifier>>,
    /// Checks the handshake signatures, which are verified either way.
    provider: Arc<CryptoProvider>,
    /// The last end-entity certificate presented.
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl RecordingVerifier {
    /// Verifies with `inner` (accepts any certificate when `None`).
    pub fn new(inner: Option<Arc<WebPkiServerVerifier>>, provider: Arc<CryptoProvider>) -> Self {
        RecordingVerifier { inner, provider, seen: Mutex::new(None) }
    }

    /// The certificate the server presented, if the handshake got that far.
    pub fn seen(&self) -> Option<CertificateDer<'static>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.clone().into_owned());
        match &self.inner {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            None => Ok(ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
