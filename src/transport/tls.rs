//! TLS for QUIC. Secure by default: both sides present a certificate from
//! the cluster CA and verify the other's against it; a peer or client with
//! another certificate (or none) is refused during the handshake.
//!
//! `insecure` configurations exist for experiments only: the server uses a
//! throwaway self-signed certificate and asks for none, the client accepts
//! any server. The node logs loudly when they are in use.

use crate::certs::{CA_CERT, CERT, KEY, SERVER_NAME};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read {}: {reason} (make one with `gossipkv certs issue`)", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("{} holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto setup failed: {0}")]
    Quic(String),
    #[error("self-signed certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What a node or client needs from its TLS directory.
#[derive(Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read_err = |reason: String| TlsError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl TlsIdentity {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let ca_path = dir.join(CA_CERT);
        for ca in certs(&ca_path)? {
            roots.add(ca).map_err(|e| TlsError::Read {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        }
        let chain = certs(&dir.join(CERT))?;
        let key_path = dir.join(KEY);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read {
            path: key_path,
            reason: e.to_string(),
        })?;
        Ok(TlsIdentity {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The QUIC transport settings every connection starts from (keep-alive,
/// idle timeout); the node adds its stream limits on the server side.
pub fn base_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Duration::from_secs(30).try_into().ok());
    transport
}

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(base_transport())
}

/// Server side of every ALPN in `alpns`, requiring a client certificate
/// from the cluster CA (or, with `None`, the insecure mode).
pub fn server_config(
    identity: Option<&TlsIdentity>,
    alpns: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match identity {
        Some(id) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                id.roots.clone(),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_single_cert(id.chain.clone(), id.key.clone_key())?
        }
        None => {
            let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
            let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der())
                .map_err(|e| TlsError::Quic(e.to_string()))?;
            builder
                .with_no_client_auth()
                .with_single_cert(vec![cert.cert.der().clone()], key)?
        }
    };
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// Client side for `alpn`, presenting our certificate and verifying the
/// server's against the cluster CA (or, with `None`, trusting any server).
pub fn client_config(
    identity: Option<&TlsIdentity>,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut tls = match identity {
        Some(id) => builder
            .with_root_certificates(id.roots.clone())
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider())))
            .with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    Ok(config)
}

/// The insecure mode's server check: none (signatures are still verified,
/// so the handshake itself is sound).
#[derive(Debug)]
struct AcceptAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
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
            &self.0.signature_verification_algorithms,
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
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
