//! The cluster's certificates: one certificate authority per cluster, and
//! node and client certificates it signs. Peers and clients authenticate
//! each other with mutual TLS against that CA.
//!
//! Files (PEM) in a TLS directory, which `--tls-dir` then uses as is:
//! - `ca.pem`: the cluster CA certificate (trust anchor);
//! - `cert.pem`, `key.pem`: this node's or client's certificate and key;
//! - in the CA directory only, `ca-key.pem`: the CA's private key (keep it
//!   off the nodes), and `revoked.json`, the CA's record of the certificates
//!   it revoked;
//! - `crl.pem`, optional: the certificate revocation list. [`revoke`] writes
//!   it into the CA directory, signed by the CA; the operator copies it into
//!   every node's TLS directory, where the node reads it at start and on
//!   reload (SIGHUP). Without it nothing is checked for revocation.
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
//!
//! Revocation invariants: the revoked list only grows (nothing is
//! un-revoked), every CRL written has a higher CRL number than the one
//! before, and every CRL lists every serial in the list, so the newest
//! `crl.pem` is always the complete answer. Serials are compared without
//! leading zero bytes (DER adds one when the high bit is set).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
/// The certificate revocation list, in the CA directory (written by
/// [`revoke`]) and, copied there by the operator, in a node's TLS directory.
pub const CRL: &str = "crl.pem";
/// In the CA directory: the certificates the CA revoked (JSON).
pub const REVOKED: &str = "revoked.json";
/// Days a CRL says it is current for. Nodes do not refuse an older CRL
/// (rustls does not enforce nextUpdate by default, and a cluster without
/// a fresh CRL should keep working); it is informational.
pub const CRL_DAYS: u32 = 365;
/// A certificate expiring within this many days is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
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
    #[error("{} is not issued by the CA in {}: revoke it with the CA that issued it", cert.display(), ca.display())]
    NotFromThisCa { cert: PathBuf, ca: PathBuf },
    #[error("invalid serial number {0:?}: use hex digits (colons allowed), as `gossipkv certs revoke` prints them")]
    BadSerial(String),
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

/// The CA certificate (PEM) in `ca_dir` and the issuer made of it and the
/// CA key.
fn load_issuer(ca_dir: &Path) -> Result<(String, Issuer<'static, KeyPair>), CertError> {
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
    Ok((ca_pem, issuer))
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
    if days == 0 || days > MAX_DAYS {
        return Err(CertError::BadDays { days });
    }
    let (not_before, not_after) = validity(days);
    issue_with_validity(ca_dir, name, role, not_before, not_after, out)
}

/// [`issue`] with an explicit validity window, which may lie in the past:
/// for tests of expired certificates. Not for operators (`issue` bounds the
/// lifetime; this does not).
#[doc(hidden)]
pub fn issue_with_validity(
    ca_dir: &Path,
    name: &str,
    role: Role,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    out: &Path,
) -> Result<(), CertError> {
    check_name(name)?;
    let (ca_pem, issuer) = load_issuer(ca_dir)?;
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
    (params.not_before, params.not_after) = (not_before, not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    write(&out.join(KEY), &key.serialize_pem(), true)?;
    write(&out.join(CERT), &cert.pem(), false)?;
    write(&out.join(CA_CERT), &ca_pem, false)?;
    Ok(())
}

/// A certificate's serial number (DER, without leading zero bytes).
pub fn serial_of(der: &[u8]) -> Result<Vec<u8>, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Parse(e.to_string()))?;
    Ok(normalize_serial(cert.raw_serial()))
}

/// Drops the leading zero bytes DER puts before a serial whose high bit is
/// set, so that serials from certificates, CRLs and operators compare equal.
pub fn normalize_serial(bytes: &[u8]) -> Vec<u8> {
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    bytes[start..].to_vec()
}

/// A serial as lowercase hex digits.
pub fn serial_hex(serial: &[u8]) -> String {
    serial.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a serial given as hex digits, with or without `0x` and colons.
pub fn parse_serial(text: &str) -> Result<Vec<u8>, CertError> {
    let bad = || CertError::BadSerial(text.to_string());
    let digits: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|&c| c != ':')
        .collect();
    if digits.is_empty() || digits.len() > 42 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let padded = if digits.len() % 2 == 1 {
        format!("0{digits}")
    } else {
        digits
    };
    let bytes = (0..padded.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).map_err(|_| bad()))
        .collect::<Result<Vec<u8>, _>>()?;
    Ok(normalize_serial(&bytes))
}

/// One revoked certificate, as the CA directory's `revoked.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Lowercase hex, without leading zero bytes.
    pub serial: String,
    /// The certificate's role and name, when it was revoked by file.
    pub holder: Option<String>,
    /// Seconds since the Unix epoch.
    pub revoked_at: i64,
}

/// The CA's revocation record (`revoked.json`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RevokedList {
    /// The number of the last CRL written.
    crl_number: u64,
    revoked: Vec<Revoked>,
}

fn load_revoked(ca_dir: &Path) -> Result<RevokedList, CertError> {
    let path = ca_dir.join(REVOKED);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| CertError::Invalid {
            path,
            reason: format!("damaged revocation record: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevokedList::default()),
        Err(source) => Err(CertError::Io {
            action: "read",
            path,
            source,
        }),
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// reader (or a crash) sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, contents: &str) -> Result<(), CertError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    write(&tmp, contents, false)?;
    std::fs::rename(&tmp, path).map_err(|source| CertError::Io {
        action: "replace",
        path: path.to_path_buf(),
        source,
    })
}

/// What to revoke: a certificate file, or a serial number.
#[derive(Clone, Debug)]
pub enum RevokeTarget {
    Cert(PathBuf),
    Serial(String),
}

/// What [`revoke`] did.
#[derive(Clone, Debug)]
pub struct Revocation {
    pub revoked: Revoked,
    /// The certificate was already in the list (the CRL is written anyway).
    pub already: bool,
    /// Certificates the new CRL lists.
    pub total: usize,
    /// The CRL written (in the CA directory).
    pub crl: PathBuf,
}

/// Revokes a certificate of the CA in `ca_dir`: records it in
/// `revoked.json` and writes a new `crl.pem`, signed by the CA, listing
/// every revoked certificate. Revoking a certificate twice only rewrites
/// the CRL. A certificate file must be one this CA issued.
pub fn revoke(ca_dir: &Path, target: &RevokeTarget) -> Result<Revocation, CertError> {
    let (ca_pem, issuer) = load_issuer(ca_dir)?;
    let (serial, holder) = match target {
        RevokeTarget::Serial(text) => (parse_serial(text)?, None),
        RevokeTarget::Cert(path) => {
            let invalid = |reason: String| CertError::Invalid {
                path: path.clone(),
                reason,
            };
            let cert_pem = read(path)?;
            let der = pem_der(&cert_pem, "CERTIFICATE").map_err(invalid)?;
            let ca_der = pem_der(&ca_pem, "CERTIFICATE").map_err(|reason| CertError::Invalid {
                path: ca_dir.join(CA_CERT),
                reason,
            })?;
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(e.to_string()))?;
            let (_, ca) =
                x509_parser::parse_x509_certificate(&ca_der).map_err(|e| CertError::Invalid {
                    path: ca_dir.join(CA_CERT),
                    reason: e.to_string(),
                })?;
            if cert.issuer().as_raw() != ca.subject().as_raw() {
                return Err(CertError::NotFromThisCa {
                    cert: path.clone(),
                    ca: ca_dir.to_path_buf(),
                });
            }
            let holder = identity_of(&der).ok().map(|id| id.to_string());
            (normalize_serial(cert.raw_serial()), holder)
        }
    };
    let mut list = load_revoked(ca_dir)?;
    let hex = serial_hex(&serial);
    let already = list.revoked.iter().find(|r| r.serial == hex).cloned();
    let revoked = match &already {
        Some(entry) => entry.clone(),
        None => {
            let entry = Revoked {
                serial: hex,
                holder,
                revoked_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            };
            list.revoked.push(entry.clone());
            entry
        }
    };
    list.crl_number += 1;
    let crl = sign_crl(&issuer, &list)?;
    // The record first: if the CRL write fails, revoking again rewrites it.
    let record = serde_json::to_string_pretty(&list).map_err(|e| CertError::Invalid {
        path: ca_dir.join(REVOKED),
        reason: e.to_string(),
    })?;
    write_atomic(&ca_dir.join(REVOKED), &record)?;
    let crl_path = ca_dir.join(CRL);
    write_atomic(&crl_path, &crl)?;
    Ok(Revocation {
        revoked,
        already: already.is_some(),
        total: list.revoked.len(),
        crl: crl_path,
    })
}

/// The CRL (PEM) listing every certificate in `list`.
fn sign_crl(issuer: &Issuer<'_, KeyPair>, list: &RevokedList) -> Result<String, CertError> {
    let now = time::OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::with_capacity(list.revoked.len());
    for entry in &list.revoked {
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&parse_serial(&entry.serial)?),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(entry.revoked_at)
                .unwrap_or(now),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        // An hour back, as certificates, for clock skew.
        this_update: now - Duration::from_secs(3600),
        next_update: now + Duration::from_secs(u64::from(CRL_DAYS) * 86_400),
        crl_number: SerialNumber::from(list.crl_number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.pem()?)
}

/// The DER of the single PEM block labelled `label` in `text`.
fn pem_der(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(text.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
    if pem.label != label {
        return Err(format!("holds a {:?} block, expected {label:?}", pem.label));
    }
    Ok(pem.contents)
}

/// A parsed certificate revocation list.
#[derive(Clone, Debug)]
pub struct Crl {
    pub der: Vec<u8>,
    /// The revoked serials (without leading zero bytes).
    pub revoked: Vec<Vec<u8>>,
}

/// Reads and parses a `crl.pem`. Its signature is not checked here (the
/// TLS layer checks it against the CA, see `TlsIdentity::load`).
pub fn read_crl(path: &Path) -> Result<Crl, CertError> {
    let invalid = |reason: String| CertError::Invalid {
        path: path.to_path_buf(),
        reason: format!("damaged certificate revocation list: {reason}"),
    };
    let der = pem_der(&read(path)?, "X509 CRL").map_err(invalid)?;
    let (rest, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| invalid(e.to_string()))?;
    if !rest.is_empty() {
        return Err(invalid(format!("{} bytes after the list", rest.len())));
    }
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| normalize_serial(r.raw_serial()))
        .collect();
    Ok(Crl { der, revoked })
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2026-01-31T12:00:00Z`).
pub fn rfc3339(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} s after the Unix epoch"),
    }
}

/// Whole days from now until `not_after` (negative once expired).
pub fn days_left(not_after: i64) -> i64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    (not_after - now).div_euclid(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_der(dir: &Path) -> Vec<u8> {
        pem_der(&read(&dir.join(CERT)).unwrap(), "CERTIFICATE").unwrap()
    }

    #[test]
    fn serials_parse_with_colons_and_compare_without_leading_zeros() {
        assert_eq!(parse_serial("0x00:8f:01").unwrap(), vec![0x8f, 0x01]);
        assert_eq!(parse_serial("8F01").unwrap(), vec![0x8f, 0x01]);
        assert_eq!(parse_serial("f01").unwrap(), vec![0x0f, 0x01]);
        assert_eq!(normalize_serial(&[0, 0]), vec![0]);
        assert!(parse_serial("").is_err());
        assert!(parse_serial("xyz").is_err());
        assert!(parse_serial(&"f".repeat(50)).is_err());
    }

    #[test]
    fn revoking_writes_a_crl_listing_every_revoked_serial() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test").unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        issue(&ca, "a", Role::Client, 30, &a).unwrap();
        issue(&ca, "b", Role::Node, 30, &b).unwrap();
        let serial_a = serial_of(&cert_der(&a)).unwrap();
        let serial_b = serial_of(&cert_der(&b)).unwrap();

        let first = revoke(&ca, &RevokeTarget::Cert(a.join(CERT))).unwrap();
        assert!(!first.already);
        assert_eq!(first.total, 1);
        assert_eq!(first.revoked.serial, serial_hex(&serial_a));
        assert_eq!(
            first.revoked.holder.as_deref(),
            Some("client certificate \"a\"")
        );
        assert_eq!(
            read_crl(&first.crl).unwrap().revoked,
            vec![serial_a.clone()]
        );

        let second = revoke(&ca, &RevokeTarget::Serial(serial_hex(&serial_b))).unwrap();
        assert_eq!(second.total, 2);
        let again = revoke(&ca, &RevokeTarget::Cert(a.join(CERT))).unwrap();
        assert!(again.already);
        assert_eq!(again.total, 2);
        let crl = read_crl(&ca.join(CRL)).unwrap();
        assert_eq!(crl.revoked, vec![serial_a, serial_b]);
        let (_, parsed) = x509_parser::parse_x509_crl(&crl.der).unwrap();
        // Three CRLs written: each has a higher number.
        assert_eq!(parsed.crl_number().map(|n| n.to_string()), Some("3".into()));
    }

    #[test]
    fn revoking_refuses_another_cas_certificate_and_damaged_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let other = dir.path().join("other");
        init_ca(&ca, "test").unwrap();
        init_ca(&other, "other").unwrap();
        let stranger = dir.path().join("stranger");
        issue(&other, "x", Role::Client, 30, &stranger).unwrap();
        let err = revoke(&ca, &RevokeTarget::Cert(stranger.join(CERT))).unwrap_err();
        assert!(matches!(err, CertError::NotFromThisCa { .. }), "{err}");
        assert!(!ca.join(CRL).exists());

        std::fs::write(ca.join(REVOKED), "{not json").unwrap();
        let err = revoke(&ca, &RevokeTarget::Serial("01".into())).unwrap_err();
        assert!(err.to_string().contains(REVOKED), "{err}");

        let crl = dir.path().join(CRL);
        std::fs::write(
            &crl,
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .unwrap();
        let err = read_crl(&crl).unwrap_err();
        assert!(err.to_string().contains("crl.pem"), "{err}");
        assert!(err.to_string().contains("damaged"), "{err}");
        std::fs::write(&crl, read(&ca.join(CA_CERT)).unwrap()).unwrap();
        let err = read_crl(&crl).unwrap_err();
        assert!(err.to_string().contains("CERTIFICATE"), "{err}");
    }

    #[test]
    fn dates_show_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(days_left(now + 86_400 * 3 + 60), 3);
        assert!(days_left(now - 10) < 0);
    }
}
