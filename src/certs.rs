//! The cluster's certificates: one certificate authority per cluster, and
//! node and client certificates it signs. Peers and clients authenticate
//! each other with mutual TLS against that CA.
//!
//! Files (PEM) in a TLS directory, which `--tls-dir` then uses as is:
//! - `ca.pem`: the cluster CA certificate (trust anchor);
//! - `cert.pem`, `key.pem`: this node's or client's certificate and key;
//! - in the CA directory only, `ca-key.pem`: the CA's private key (keep it
//!   off the nodes).
//!
//! Every certificate carries its holder's role and name in a URI subject
//! alternative name, `gossipkv://ROLE/NAME` (see [`Role`]), which every
//! listener reads from the verified certificate and decides by:
//! - `node`: a cluster member. Only node certificates are accepted on the
//!   peer protocol, and the node's id is derived from the name
//!   ([`crate::crdt::NodeId::from_name`]), so a node cannot speak for another.
//!   A node certificate also names [`SERVER_NAME`], `localhost` and the
//!   loopback addresses (it is a TLS server certificate too).
//! - `client`: reads and writes, and read-only inspection (status, members,
//!   layout, inspect, migrations). Valid for client auth only.
//! - `admin`: everything a client may do, plus changing the cluster (join,
//!   leave). Valid for client auth only.
//!
//! A certificate without a gossipkv URI (from an older release or another
//! tool) has no role and is refused everywhere.
//!
//! Lifetimes: the CA is valid for [`CA_DAYS`] days, issued certificates for
//! [`DEFAULT_DAYS`] unless asked otherwise; both start an hour in the past
//! so that modest clock skew between machines does not refuse them.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
/// The name every node certificate carries and every connection verifies:
/// peers are reached by address, and any holder of a node certificate from
/// the cluster CA is a legitimate cluster member.
pub const SERVER_NAME: &str = "gossipkv";
/// Days a new cluster CA is valid for.
pub const CA_DAYS: u32 = 3650;
/// Days an issued certificate is valid for, unless asked otherwise.
pub const DEFAULT_DAYS: u32 = 365;
/// Longest lifetime `issue` accepts, in days.
pub const MAX_DAYS: u32 = 3650;
/// The URI scheme of the role-and-name subject alternative name.
const URI_PREFIX: &str = "gossipkv://";

/// What a certificate's holder may do (see the module doc).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Node,
    Client,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "node" => Ok(Role::Node),
            "client" => Ok(Role::Client),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}: use node, client or admin")),
        }
    }
}

/// Who a verified certificate names: its role and name, and when it
/// expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertIdentity {
    pub role: Role,
    pub name: String,
    /// Seconds since the Unix epoch after which the certificate is invalid.
    pub not_after: i64,
}

impl fmt::Display for CertIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} certificate {:?}", self.role, self.name)
    }
}

/// Why a certificate names no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the certificate carries no gossipkv role (no {URI_PREFIX}ROLE/NAME name); issue a new one with `gossipkv certs issue`")]
    NoRole,
    #[error("the certificate's gossipkv name {0:?} is malformed")]
    Malformed(String),
    #[error("the certificate carries more than one gossipkv role name")]
    Ambiguous,
}

/// Reads the role and name from a certificate (DER). The certificate's
/// signature is not checked here: call it on certificates TLS verified.
pub fn identity_of(der: &[u8]) -> Result<CertIdentity, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    let mut found = None;
    for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(URI_PREFIX) else {
            continue;
        };
        let malformed = || IdentityError::Malformed(uri.to_string());
        let (role, name) = rest.split_once('/').ok_or_else(malformed)?;
        let role: Role = role.parse().map_err(|_| malformed())?;
        check_name(name).map_err(|_| malformed())?;
        if found.is_some() {
            return Err(IdentityError::Ambiguous);
        }
        found = Some((role, name.to_string()));
    }
    let (role, name) = found.ok_or(IdentityError::NoRole)?;
    Ok(CertIdentity {
        role,
        name,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Checks a certificate (or node) name: 1 to 63 letters, digits, '-' or
/// '.', as DNS labels allow.
pub fn check_name(name: &str) -> Result<(), CertError> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        return Err(CertError::BadName {
            name: name.to_string(),
            reason: "use 1 to 63 letters, digits, '-' or '.'",
        });
    }
    Ok(())
}

/// The validity window of a certificate issued now for `days`.
fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - Duration::from_secs(3600),
        now + Duration::from_secs(u64::from(days) * 86_400),
    )
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} already exists; refusing to overwrite a certificate authority", path.display())]
    Exists { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("invalid certificate name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("invalid lifetime of {days} days: use 1 to {MAX_DAYS}")]
    BadDays { days: u32 },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |action, source| CertError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(path, contents).map_err(|e| io("write", e))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io("restrict permissions of", e))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        action: "create directory",
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates a new cluster CA in `dir` (`ca.pem`, `ca-key.pem`).
pub fn init_ca(dir: &Path, cluster: &str) -> Result<(), CertError> {
    create_dir(dir)?;
    let cert_path = dir.join(CA_CERT);
    if cert_path.exists() {
        return Err(CertError::Exists { path: cert_path });
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("gossipkv cluster CA {cluster}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(CA_DAYS);
    let cert = params.self_signed(&key)?;
    write(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(())
}

/// Issues a certificate for `role` named `name`, valid for `days`, signed
/// by the CA in `ca_dir`, into `out` with a copy of the CA certificate.
pub fn issue(
    ca_dir: &Path,
    name: &str,
    role: Role,
    days: u32,
    out: &Path,
) -> Result<(), CertError> {
    check_name(name)?;
    if days == 0 || days > MAX_DAYS {
        return Err(CertError::BadDays { days });
    }
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca_key_path = ca_dir.join(CA_KEY);
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?).map_err(|e| CertError::Invalid {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| CertError::Invalid {
        path: ca_dir.join(CA_CERT),
        reason: e.to_string(),
    })?;
    let client = role != Role::Node;
    let names = if client {
        vec![name.to_string()]
    } else {
        vec![
            name.to_string(),
            SERVER_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ]
    };
    let mut params = CertificateParams::new(names)?;
    let uri = format!("{URI_PREFIX}{role}/{name}");
    params
        .subject_alt_names
        .push(SanType::URI(uri.as_str().try_into()?));
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if client {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    write(&out.join(KEY), &key.serialize_pem(), true)?;
    write(&out.join(CERT), &cert.pem(), false)?;
    write(&out.join(CA_CERT), &ca_pem, false)?;
    Ok(())
}
