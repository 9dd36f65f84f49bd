//! TLS for QUIC. Secure by default: both sides present a certificate from
//! the cluster CA and verify the other's against it; a peer or client with
//! another certificate (or none) is refused during the handshake.
//!
//! Revocation: a `crl.pem` in the TLS directory (see [`crate::certs`]) is
//! given to both verifiers, the server's client verifier and the client's
//! server verifier, so a revoked certificate can neither connect nor serve.
//! The CRL is checked against the CA when it is loaded: a CRL another CA
//! signed, or a damaged one, is refused then, naming the file, rather than
//! refusing every handshake later. Without a CRL rustls checks no
//! revocation. With one, a certificate whose status the CRL cannot tell is
//! refused (rustls's default); every certificate our CA issued is in the
//! scope of our CA's CRL, so that refuses only certificates of other CAs,
//! which the chain check refuses anyway.
//!
//! `insecure` configurations exist for experiments only: the server uses a
//! throwaway self-signed certificate and asks for none, the client accepts
//! any server. The node logs loudly when they are in use.

use crate::certs::{
    identity_of, read_crl, serial_of, CertIdentity, IdentityError, CA_CERT, CERT, CRL, KEY,
    SERVER_NAME,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
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
    #[error("certificate verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto setup failed: {0}")]
    Quic(String),
    #[error("{}: {source}", path.display())]
    Identity {
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("{} is readable by group or others (mode {mode:03o}): a private key must be readable by its owner alone; run `chmod 600 {}`", path.display(), path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("self-signed certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{}: {reason}", path.display())]
    Crl { path: PathBuf, reason: String },
    /// Reading a certificate file (the CRL) failed; the error names it.
    #[error(transparent)]
    Cert(#[from] crate::certs::CertError),
    #[error("{} is revoked by {}: issue a new certificate with `gossipkv certs issue`", cert.display(), crl.display())]
    OwnCertificateRevoked { cert: PathBuf, crl: PathBuf },
}

/// What a node or client needs from its TLS directory.
#[derive(Clone)]
pub struct TlsIdentity {
    dir: PathBuf,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    identity: CertIdentity,
    serial: Vec<u8>,
    /// The CRL from `crl.pem`, if there is one (checked against the CA).
    crls: Vec<CertificateRevocationListDer<'static>>,
    /// The serials it revokes.
    revoked: Vec<Vec<u8>>,
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
    /// Loads `ca.pem`, `cert.pem`, `key.pem` and, if present, `crl.pem`
    /// from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let ca_path = dir.join(CA_CERT);
        for ca in certs(&ca_path)? {
            roots.add(ca).map_err(|e| TlsError::Read {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        }
        let cert_path = dir.join(CERT);
        let chain = certs(&cert_path)?;
        let identity = identity_of(&chain[0]).map_err(|source| TlsError::Identity {
            path: cert_path.clone(),
            source,
        })?;
        let serial = serial_of(&chain[0]).map_err(|source| TlsError::Identity {
            path: cert_path.clone(),
            source,
        })?;
        let key_path = dir.join(KEY);
        check_key_permissions(&key_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read {
            path: key_path,
            reason: e.to_string(),
        })?;
        let roots = Arc::new(roots);
        let crl_path = dir.join(CRL);
        let (crls, revoked) = if crl_path.exists() {
            let crl = read_crl(&crl_path)?;
            let der = CertificateRevocationListDer::from(crl.der);
            check_crl(
                &roots,
                &der,
                &chain[0],
                identity.not_after,
                &crl_path,
                &cert_path,
            )?;
            (vec![der], crl.revoked)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(TlsIdentity {
            dir: dir.to_path_buf(),
            roots,
            chain,
            key: Arc::new(key),
            identity,
            serial,
            crls,
            revoked,
        })
    }

    /// The directory it was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This certificate's serial number (without leading zero bytes).
    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    /// Whether the directory has a CRL (`crl.pem`).
    pub fn has_crl(&self) -> bool {
        !self.crls.is_empty()
    }

    /// The serials the CRL revokes (none without a CRL).
    pub fn revoked(&self) -> &[Vec<u8>] {
        &self.revoked
    }

    /// The certificate (DER) this identity presents.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The role and name this certificate carries.
    pub fn identity(&self) -> &CertIdentity {
        &self.identity
    }
}

/// Checks a CRL against the CA by verifying our own certificate with it, as
/// a peer would: a CRL that another CA signed (no CRL then covers our
/// certificate: unknown revocation status) or whose signature does not
/// verify is refused here, naming the file, instead of refusing every
/// handshake once installed. Our own certificate being revoked is refused
/// too: peers would refuse it. The check runs at a time inside our
/// certificate's validity, so an expired certificate (warned about
/// elsewhere) does not hide a bad CRL.
fn check_crl(
    roots: &Arc<RootCertStore>,
    crl: &CertificateRevocationListDer<'static>,
    leaf: &CertificateDer<'static>,
    not_after: i64,
    crl_path: &Path,
    cert_path: &Path,
) -> Result<(), TlsError> {
    use rustls::CertificateError;
    let crl_err = |reason: String| TlsError::Crl {
        path: crl_path.to_path_buf(),
        reason,
    };
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .with_crls([crl.clone()])
            .build()
            .map_err(|e| crl_err(e.to_string()))?;
    let now = UnixTime::now().as_secs();
    let at = now.min(u64::try_from(not_after.saturating_sub(1)).unwrap_or(0));
    let at = UnixTime::since_unix_epoch(Duration::from_secs(at));
    match verifier.verify_client_cert(leaf, &[], at) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertRevocationList(
            rustls::CertRevocationListError::BadSignature,
        )) => Err(crl_err(format!(
            "not issued by the CA in {CA_CERT}: its signature does not verify (copy crl.pem from the CA directory that issued this certificate)"
        ))),
        Err(rustls::Error::InvalidCertRevocationList(e)) => Err(crl_err(format!(
            "not a usable revocation list of the CA in {CA_CERT}: {e:?}"
        ))),
        Err(rustls::Error::InvalidCertificate(CertificateError::UnknownRevocationStatus)) => {
            Err(crl_err(format!(
                "not issued by the CA in {CA_CERT} (copy crl.pem from the CA directory that issued this certificate)"
            )))
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked)) => {
            Err(TlsError::OwnCertificateRevoked {
                cert: cert_path.to_path_buf(),
                crl: crl_path.to_path_buf(),
            })
        }
        // Anything else is about the certificate, not the CRL (not from
        // this CA, not yet valid): the handshakes report it.
        Err(_) => Ok(()),
    }
}

/// Refuses a private key file that others than its owner can read, as
/// CockroachDB and ssh do: such a key may already be another's.
fn check_key_permissions(path: &Path) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| TlsError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The identity in the certificate a connection's other end presented
/// (verified against the cluster CA during the handshake): `None` when it
/// presented none (the insecure mode).
pub fn peer_identity(
    connection: &quinn::Connection,
) -> Option<Result<CertIdentity, IdentityError>> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|leaf| identity_of(leaf))
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

/// A TLS 1.3 server with `identity`'s certificate that verifies client
/// certificates against the cluster CA (and the CRL): the QUIC listener
/// and the HTTPS API both use it. No ALPN set. Without `anonymous_clients`
/// a client certificate is required; with it a client may present none
/// (the HTTP API then asks for a bearer token), and one it presents is
/// verified all the same.
pub fn https_server_config(
    identity: &TlsIdentity,
    anonymous_clients: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        identity.roots.clone(),
        provider(),
    )
    .with_crls(identity.crls.iter().cloned());
    if anonymous_clients {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?)
}

/// Server side of every ALPN in `alpns`, requiring a client certificate
/// from the cluster CA (or, with `None`, the insecure mode).
pub fn server_config(
    identity: Option<&TlsIdentity>,
    alpns: &[&[u8]],
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = match identity {
        Some(id) => https_server_config(id, false)?,
        None => {
            let builder = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?;
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
        Some(id) => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                id.roots.clone(),
                provider(),
            )
            .with_crls(id.crls.iter().cloned())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .with_webpki_verifier(verifier)
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())?
        }
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

/// The QUIC application error code a node closes a connection with when it
/// refuses it after the handshake (by role, or its certificate was revoked
/// by a reload); the close reason says why.
pub const REFUSED: quinn::VarInt = quinn::VarInt::from_u32(3);

/// What was wrong with a refused certificate, from the TLS alert.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertProblem {
    Revoked,
    /// Expired, or not valid yet (TLS has one alert for both).
    Expired,
    /// Not from the cluster CA (or, with a CRL, of unknown revocation status).
    UnknownCa,
    /// None presented.
    Missing,
    /// Not valid for this use: e.g. a client certificate serving.
    WrongPurpose,
    /// Another alert, by name.
    Other(String),
}

impl std::fmt::Display for CertProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertProblem::Revoked => f.write_str("it is revoked"),
            CertProblem::Expired => f.write_str("it has expired (or is not valid yet)"),
            CertProblem::UnknownCa => f.write_str("it is not from the cluster CA"),
            CertProblem::Missing => f.write_str("none was presented"),
            CertProblem::WrongPurpose => f.write_str("it is not valid for this use"),
            CertProblem::Other(alert) => write!(f, "TLS alert {alert}"),
        }
    }
}

/// A handshake (or admission) refusal read from a connection error.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The other end refused our certificate.
    OursRefused(CertProblem),
    /// We refused the other end's certificate; `detail` is rustls's reason.
    TheirsRefused {
        problem: CertProblem,
        detail: String,
    },
    /// The other end closed the connection with [`REFUSED`] and this reason.
    Closed(String),
}

/// Whether `error` is a refusal, and which. Other errors (timeouts, resets,
/// a node shutting down) are `None`: they are not about certificates.
pub fn refusal(error: &quinn::ConnectionError) -> Option<Refusal> {
    use quinn::ConnectionError as E;
    match error {
        // The other end's TLS sent an alert: it refused our certificate.
        E::ConnectionClosed(close) => {
            alert_of(u64::from(close.error_code)).map(Refusal::OursRefused)
        }
        // Our TLS failed the handshake: it refused the other end's.
        E::TransportError(e) => alert_of(u64::from(e.code)).map(|problem| Refusal::TheirsRefused {
            problem,
            detail: e.reason.clone(),
        }),
        E::ApplicationClosed(close) if close.error_code == REFUSED => Some(Refusal::Closed(
            String::from_utf8_lossy(&close.reason).into_owned(),
        )),
        _ => None,
    }
}

/// The certificate problem a QUIC crypto error code (0x100 + TLS alert)
/// stands for; `None` for codes that are not TLS alerts.
fn alert_of(code: u64) -> Option<CertProblem> {
    use rustls::AlertDescription as A;
    if !(0x100..=0x1ff).contains(&code) {
        return None;
    }
    let alert = A::from((code - 0x100) as u8);
    Some(match alert {
        A::CertificateRevoked => CertProblem::Revoked,
        A::CertificateExpired => CertProblem::Expired,
        A::UnknownCA => CertProblem::UnknownCa,
        A::CertificateRequired => CertProblem::Missing,
        A::UnsupportedCertificate => CertProblem::WrongPurpose,
        other => CertProblem::Other(format!("{other:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_codes_name_the_certificate_problem() {
        assert_eq!(alert_of(0x100 + 44), Some(CertProblem::Revoked));
        assert_eq!(alert_of(0x100 + 45), Some(CertProblem::Expired));
        assert_eq!(alert_of(0x100 + 48), Some(CertProblem::UnknownCa));
        assert_eq!(alert_of(0x100 + 116), Some(CertProblem::Missing));
        assert_eq!(alert_of(0x0a), None);
        let refused = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: REFUSED,
            reason: "no".into(),
        });
        assert_eq!(refusal(&refused), Some(Refusal::Closed("no".into())));
        let shutdown = quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: 0u32.into(),
            reason: "shutting down".into(),
        });
        assert_eq!(refusal(&shutdown), None);
        assert_eq!(refusal(&quinn::ConnectionError::TimedOut), None);
    }

    fn setup(dir: &Path, cluster: &str) -> PathBuf {
        let ca = dir.join("ca");
        crate::certs::init_ca(&ca, cluster).unwrap();
        ca
    }

    #[test]
    fn a_crl_is_loaded_and_checked_against_the_ca() {
        use crate::certs::{issue, revoke, RevokeTarget, Role};
        let dir = tempfile::tempdir().unwrap();
        let ca = setup(dir.path(), "test");
        let node = dir.path().join("node");
        let gone = dir.path().join("gone");
        issue(&ca, "node-1", Role::Node, 30, &node).unwrap();
        issue(&ca, "gone", Role::Client, 30, &gone).unwrap();
        assert!(!TlsIdentity::load(&node).unwrap().has_crl());

        revoke(&ca, &RevokeTarget::Cert(gone.join(CERT))).unwrap();
        std::fs::copy(ca.join(CRL), node.join(CRL)).unwrap();
        let id = TlsIdentity::load(&node).unwrap();
        assert!(id.has_crl());
        let gone_id = TlsIdentity::load(&gone).unwrap();
        assert_eq!(id.revoked(), [gone_id.serial().to_vec()]);
        server_config(Some(&id), &[b"x"]).unwrap();
        client_config(Some(&id), b"x").unwrap();

        // Our own certificate revoked: refused, naming it.
        std::fs::copy(ca.join(CRL), gone.join(CRL)).unwrap();
        let err = TlsIdentity::load(&gone).unwrap_err();
        assert!(
            matches!(err, TlsError::OwnCertificateRevoked { .. }),
            "{err}"
        );

        // A CRL of another CA, with the same name as ours (a signature
        // that does not verify) or another (no CRL covers our certificate):
        // refused, naming the file.
        for cluster in ["test", "other"] {
            let other = dir.path().join(cluster);
            std::fs::create_dir_all(&other).unwrap();
            let other_ca = setup(&other, cluster);
            issue(&other_ca, "x", Role::Client, 30, &other.join("x")).unwrap();
            revoke(&other_ca, &RevokeTarget::Cert(other.join("x").join(CERT))).unwrap();
            std::fs::copy(other_ca.join(CRL), node.join(CRL)).unwrap();
            let err = TlsIdentity::load(&node).unwrap_err().to_string();
            assert!(
                err.contains("crl.pem") && err.contains("not issued by the CA in ca.pem"),
                "{err}"
            );
        }

        // A damaged CRL: refused, naming the file.
        std::fs::write(node.join(CRL), "garbage").unwrap();
        let err = TlsIdentity::load(&node).unwrap_err().to_string();
        assert!(err.contains("crl.pem") && err.contains("damaged"), "{err}");
    }
}
