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
//! A node certificate names `NAME`, [`SERVER_NAME`], `localhost` and the
//! loopback addresses as subject alternative names;
//! a client certificate (`--client`) is valid only for client auth.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
/// The name every node certificate carries and every connection verifies:
/// peers are reached by address, and any holder of a node certificate from
/// the cluster CA is a legitimate cluster member.
pub const SERVER_NAME: &str = "gossipkv";

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
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.self_signed(&key)?;
    write(&dir.join(CA_KEY), &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(())
}

/// Issues a node (or, with `client`, a client) certificate named `name`,
/// signed by the CA in `ca_dir`, into `out` with a copy of the CA certificate.
pub fn issue(ca_dir: &Path, name: &str, client: bool, out: &Path) -> Result<(), CertError> {
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
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    create_dir(out)?;
    write(&out.join(KEY), &key.serialize_pem(), true)?;
    write(&out.join(CERT), &cert.pem(), false)?;
    write(&out.join(CA_CERT), &ca_pem, false)?;
    Ok(())
}
