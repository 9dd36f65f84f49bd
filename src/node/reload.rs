//! The node's live TLS state, and replacing it without a restart (SIGHUP).
//!
//! Invariants:
//! - A reload installs everything or nothing. The TLS directory is loaded
//!   and validated first (a node certificate, naming this node, a CRL the
//!   CA signed that does not revoke this node); only then are the server
//!   configuration (new incoming connections), the peer client
//!   configuration (new outgoing connections) and the expiry shown by
//!   status replaced. A refused reload keeps the old configuration and
//!   says why at warn.
//! - Existing connections keep the certificates they were made with,
//!   except that every connection whose other end presented a certificate
//!   the newly loaded CRL revokes is closed, in both directions, with
//!   [`REFUSED`] and a reason: revocation takes effect at once, not at the
//!   next reconnection. To find them every admitted connection is tracked
//!   with its certificate's serial while it is served.
//! - A peer that refuses this node's handshake (or whose certificate this
//!   node refuses) is logged at warn once per address and reason, not once
//!   per dial.

use crate::certs::{days_left, rfc3339, serial_of, Role, CERT, EXPIRY_WARNING_DAYS};
use crate::transport::tls::{
    client_config, refusal, server_config, Refusal, TlsError, TlsIdentity, REFUSED,
};
use crate::transport::{ALPN_ADMIN, ALPN_CLIENT, ALPN_PEER};
use rustls::pki_types::CertificateDer;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tracing::{debug, info, warn};

/// Every ALPN the node serves.
pub(super) const ALPNS: [&[u8]; 3] = [ALPN_PEER, ALPN_CLIENT, ALPN_ADMIN];

/// Why a reload was refused (the old configuration stays).
#[derive(Debug, thiserror::Error)]
pub(super) enum ReloadError {
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{} is a {identity}, not a node certificate", path.display())]
    NotANode { path: PathBuf, identity: String },
    #[error("{} names {now:?}, but this node is {was:?}: a node's name cannot change while it runs", path.display())]
    Renamed {
        path: PathBuf,
        was: String,
        now: String,
    },
    #[error("this node runs without TLS (--insecure): there is nothing to reload")]
    Insecure,
}

/// What a reload installed.
pub(super) struct Reloaded {
    pub(super) not_after: i64,
    pub(super) revoked: usize,
    pub(super) closed: usize,
}

/// A connection being served, and the serial of the certificate its other
/// end presented.
struct Tracked {
    serial: Vec<u8>,
    remote: SocketAddr,
    connection: quinn::Connection,
}

/// The TLS configuration a running node uses, shared by the core (peer
/// connections, status), the accept loop and the SIGHUP task.
pub(super) struct LiveTls {
    /// The TLS directory and the node name its certificate must keep;
    /// `None` in the insecure mode.
    source: Option<(PathBuf, String)>,
    peer: Mutex<quinn::ClientConfig>,
    /// When the node's certificate expires (seconds since the epoch).
    not_after: Mutex<Option<i64>>,
    revoked: Mutex<HashSet<Vec<u8>>>,
    connections: Mutex<HashMap<usize, Tracked>>,
    /// The refusal last logged per peer address.
    refused: Mutex<HashMap<SocketAddr, String>>,
    /// QUIC limits of the listener (receive windows, idle timeout).
    server_transport: Arc<quinn::TransportConfig>,
    /// The HTTPS listener's configuration, when it serves HTTPS.
    https: Mutex<Option<super::http::HttpsConfig>>,
}

/// Locks, ignoring poisoning: every critical section here only replaces or
/// reads whole values, so a panic inside one cannot leave them torn.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Warns when the node's certificate has expired or expires soon.
pub(super) fn warn_if_expiring(not_after: i64, path: &Path) {
    let days = days_left(not_after);
    let at = rfc3339(not_after);
    if days < 0 {
        warn!(cert = %path.display(), expires = %at, "this node's certificate has EXPIRED: peers and clients refuse it; issue a new one (`gossipkv certs issue`) and send SIGHUP");
    } else if days < EXPIRY_WARNING_DAYS {
        warn!(cert = %path.display(), expires = %at, "this node's certificate expires in {days} days: issue a new one (`gossipkv certs issue`) and send SIGHUP");
    }
}

impl LiveTls {
    /// The state for a node started with `identity` from `dir` (both `None`
    /// in the insecure mode) and the peer client configuration made of it.
    pub(super) fn new(
        identity: Option<(&TlsIdentity, &Path)>,
        peer: quinn::ClientConfig,
        server_transport: Arc<quinn::TransportConfig>,
    ) -> LiveTls {
        LiveTls {
            server_transport,
            source: identity.map(|(id, dir)| (dir.to_path_buf(), id.identity().name.clone())),
            peer: Mutex::new(peer),
            not_after: Mutex::new(identity.map(|(id, _)| id.identity().not_after)),
            revoked: Mutex::new(
                identity
                    .map(|(id, _)| id.revoked().iter().cloned().collect())
                    .unwrap_or_default(),
            ),
            connections: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            https: Mutex::new(None),
        }
    }

    /// Makes reloads replace the HTTPS listener's configuration too.
    pub(super) fn serve_https(&self, config: super::http::HttpsConfig) {
        *lock(&self.https) = Some(config);
    }

    /// The server side of every ALPN for `identity`, with the node's
    /// transport limits (kept across reloads).
    pub(super) fn server_config(
        &self,
        identity: Option<&TlsIdentity>,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let mut server = server_config(identity, &ALPNS)?;
        server.transport_config(self.server_transport.clone());
        Ok(server)
    }

    /// The client configuration for new outgoing peer connections.
    pub(super) fn peer_config(&self) -> quinn::ClientConfig {
        lock(&self.peer).clone()
    }

    /// When the node's certificate expires (`None` without TLS).
    pub(super) fn not_after(&self) -> Option<i64> {
        *lock(&self.not_after)
    }

    /// Tracks `connection` while the returned guard lives, so that a reload
    /// revoking its certificate closes it. `None` without TLS or when the
    /// other end presented no certificate. A connection whose certificate
    /// is already revoked (it was dialled before a reload, and raced it) is
    /// closed at once.
    pub(super) fn track(self: &Arc<Self>, connection: &quinn::Connection) -> Option<TrackGuard> {
        self.source.as_ref()?;
        let chain = connection
            .peer_identity()?
            .downcast::<Vec<CertificateDer<'static>>>()
            .ok()?;
        let serial = serial_of(chain.first()?).ok()?;
        let remote = connection.remote_address();
        let key = connection.stable_id();
        {
            let mut connections = lock(&self.connections);
            connections.insert(
                key,
                Tracked {
                    serial: serial.clone(),
                    remote,
                    connection: connection.clone(),
                },
            );
        }
        if lock(&self.revoked).contains(&serial) {
            connection.close(REFUSED, b"this certificate has been revoked");
        }
        Some(TrackGuard {
            live: self.clone(),
            key,
        })
    }

    /// Re-reads the TLS directory and installs it (see the module doc).
    pub(super) fn reload(&self, endpoint: &quinn::Endpoint) -> Result<Reloaded, ReloadError> {
        let Some((dir, name)) = &self.source else {
            return Err(ReloadError::Insecure);
        };
        let identity = TlsIdentity::load(dir)?;
        let cert = identity.identity();
        let path = dir.join(CERT);
        if cert.role != Role::Node {
            return Err(ReloadError::NotANode {
                path,
                identity: cert.to_string(),
            });
        }
        if cert.name != *name {
            return Err(ReloadError::Renamed {
                path,
                was: name.clone(),
                now: cert.name.clone(),
            });
        }
        let server = self.server_config(Some(&identity))?;
        let peer = client_config(Some(&identity), ALPN_PEER)?;
        let https = lock(&self.https).clone();
        let https = match https {
            Some(slot) => Some((slot, super::http::https_config(&identity)?)),
            None => None,
        };
        // Everything is built: from here on nothing can fail.
        endpoint.set_server_config(Some(server));
        if let Some((slot, config)) = https {
            *slot.write().unwrap_or_else(PoisonError::into_inner) = config;
        }
        *lock(&self.peer) = peer;
        *lock(&self.not_after) = Some(cert.not_after);
        let revoked: HashSet<Vec<u8>> = identity.revoked().iter().cloned().collect();
        let count = revoked.len();
        *lock(&self.revoked) = revoked;
        // Peers may answer the new certificate differently: log afresh.
        lock(&self.refused).clear();
        let closed = self.close_revoked();
        warn_if_expiring(cert.not_after, &path);
        Ok(Reloaded {
            not_after: cert.not_after,
            revoked: count,
            closed,
        })
    }

    /// Closes every tracked connection whose certificate is revoked.
    fn close_revoked(&self) -> usize {
        let revoked = lock(&self.revoked);
        let connections = lock(&self.connections);
        let mut closed = 0;
        for tracked in connections.values() {
            if revoked.contains(&tracked.serial) {
                info!(remote = %tracked.remote, "closing a connection: its certificate has been revoked");
                tracked
                    .connection
                    .close(REFUSED, b"this certificate has been revoked");
                closed += 1;
            }
        }
        closed
    }

    /// Logs why an outgoing peer connection to `to` failed: a refusal at
    /// warn, once per address and reason; anything else at debug.
    pub(super) fn peer_failed(&self, to: SocketAddr, error: &quinn::ConnectionError) {
        let Some(refusal) = refusal(error) else {
            debug!(peer = %to, "peer connection ended: {error}");
            // A later refusal is news again.
            lock(&self.refused).remove(&to);
            return;
        };
        let message = match refusal {
            Refusal::OursRefused(problem) => {
                format!("the peer refused this node's certificate: {problem}")
            }
            Refusal::TheirsRefused { problem, detail } => {
                format!("refused the peer's certificate: {problem} ({detail})")
            }
            Refusal::Closed(reason) => format!("the peer refused this node: {reason}"),
        };
        let mut refused = lock(&self.refused);
        if refused.get(&to) != Some(&message) {
            warn!(peer = %to, "peer handshake refused: {message}");
            refused.insert(to, message);
        } else {
            debug!(peer = %to, "peer handshake refused again: {message}");
        }
    }
}

/// Keeps a connection tracked (see [`LiveTls::track`]) until dropped.
pub(super) struct TrackGuard {
    live: Arc<LiveTls>,
    key: usize,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        lock(&self.live.connections).remove(&self.key);
    }
}

/// The SIGHUP stream, registered before the node is reachable: a SIGHUP's
/// default action ends the process, and an operator who reloads a node
/// just after starting it must not stop it. `None` (logged) where signals
/// are unavailable.
#[cfg(unix)]
pub(super) fn hangup() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            warn!("cannot watch for SIGHUP, so the TLS directory cannot be reloaded without a restart: {e}");
            None
        }
    }
}

/// Reloads on every SIGHUP until the node stops.
#[cfg(unix)]
pub(super) async fn reload_on_hangup(
    mut signal: tokio::signal::unix::Signal,
    live: Arc<LiveTls>,
    endpoint: quinn::Endpoint,
) {
    while signal.recv().await.is_some() {
        match live.reload(&endpoint) {
            Ok(done) => info!(
                expires = %rfc3339(done.not_after),
                revoked = done.revoked,
                closed = done.closed,
                "reloaded TLS: certificate expires {}, {} revoked, {} connections closed",
                rfc3339(done.not_after),
                done.revoked,
                done.closed
            ),
            Err(e) => warn!("SIGHUP: TLS reload refused, keeping the previous configuration: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{init_ca, issue};

    #[tokio::test]
    async fn a_reload_keeps_the_name_and_role_or_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let tls = dir.path().join("node");
        init_ca(&ca, "test").unwrap();
        issue(&ca, "node-1", Role::Node, 30, &tls).unwrap();
        let id = TlsIdentity::load(&tls).unwrap();
        let server = server_config(Some(&id), &ALPNS).unwrap();
        let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let live = LiveTls::new(
            Some((&id, &tls)),
            client_config(Some(&id), ALPN_PEER).unwrap(),
            Arc::new(quinn::TransportConfig::default()),
        );
        let first = live.not_after();

        issue(&ca, "node-9", Role::Node, 10, &tls).unwrap();
        let err = live.reload(&endpoint).err().unwrap();
        assert!(matches!(err, ReloadError::Renamed { .. }), "{err}");
        issue(&ca, "node-1", Role::Client, 10, &tls).unwrap();
        let err = live.reload(&endpoint).err().unwrap();
        assert!(matches!(err, ReloadError::NotANode { .. }), "{err}");
        std::fs::write(tls.join(crate::certs::CRL), "damaged").unwrap();
        let err = live.reload(&endpoint).err().unwrap().to_string();
        assert!(err.contains("crl.pem"), "{err}");
        assert_eq!(
            live.not_after(),
            first,
            "a refused reload changed the state"
        );

        std::fs::remove_file(tls.join(crate::certs::CRL)).unwrap();
        issue(&ca, "node-1", Role::Node, 10, &tls).unwrap();
        let done = live.reload(&endpoint).unwrap();
        assert_eq!(live.not_after(), Some(done.not_after));
        assert!(days_left(done.not_after) < 11);
        assert_eq!((done.revoked, done.closed), (0, 0));

        let insecure = LiveTls::new(
            None,
            client_config(None, ALPN_PEER).unwrap(),
            Arc::new(quinn::TransportConfig::default()),
        );
        assert!(matches!(
            insecure.reload(&endpoint),
            Err(ReloadError::Insecure)
        ));
        assert_eq!(insecure.not_after(), None);
    }
}
