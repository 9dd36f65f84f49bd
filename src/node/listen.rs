//! Listening: admits each incoming connection by its verified certificate
//! and the connection limits, then reads peer frames and client requests
//! and hands them to the core loop. Nothing here touches the store.

use super::limits::{ConnResponses, Identity, Limits, Refusal};
use super::metrics::Metrics;
use super::peers::Envelope;
use super::reload::LiveTls;
use super::{limits, peers, CoreInput, Inbox};
use crate::client::{Call, ErrorCode, Failure, Response};
use crate::crdt::NodeId;
use crate::transport::tls::REFUSED;
use crate::transport::{frame, ALPN_ADMIN, ALPN_CLIENT, ALPN_PEER};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, warn};

pub(super) async fn accept_loop(
    endpoint: quinn::Endpoint,
    core: Inbox,
    metrics: Arc<Metrics>,
    me: NodeId,
    secure: bool,
    tls: Arc<LiveTls>,
    limits: Arc<Limits>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        // Counted from before the handshake, so handshakes in progress
        // count too.
        let mut slot = match limits.open() {
            Ok(slot) => slot,
            Err(refusal) => {
                if let Refusal::First(reason) = refusal {
                    warn!(%remote, "refusing connections: {reason}");
                }
                incoming.refuse();
                continue;
            }
        };
        let core = core.clone();
        let metrics = metrics.clone();
        let tls = tls.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    warn!(%remote, "refused a connection: {e}");
                    return;
                }
            };
            let identity = Identity::of(&connection);
            if let Err(refusal) = limits.identify(&mut slot, identity) {
                let reason = match refusal {
                    Refusal::First(reason) => {
                        warn!(%remote, %identity, "refusing connections: {reason}");
                        reason
                    }
                    Refusal::Again(reason) => reason,
                };
                connection.close(REFUSED, reason.as_bytes());
                return;
            }
            let alpn = connection
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|d| d.protocol);
            let alpn = match alpn.as_deref() {
                Some(ALPN_PEER) => Alpn::Peer,
                Some(ALPN_CLIENT) => Alpn::Client,
                Some(ALPN_ADMIN) => Alpn::Admin,
                _ => return connection.close(1u32.into(), b"unknown protocol"),
            };
            let role = match admit(&connection, alpn, me, secure) {
                Ok(role) => role,
                Err(reason) => {
                    warn!(%remote, "refused a connection: {reason}");
                    connection.close(REFUSED, reason.as_bytes());
                    return;
                }
            };
            // Tracked while served, so that revoking its certificate closes it.
            let _tracked = tls.track(&connection);
            match (alpn, role) {
                (Alpn::Peer, Admitted::Node(sender)) => {
                    serve_peer(connection, core, metrics, sender, &limits).await
                }
                (Alpn::Peer, _) => serve_peer(connection, core, metrics, None, &limits).await,
                (Alpn::Client, _) => serve_client(connection, core, metrics, None, &limits).await,
                (Alpn::Admin, role) => {
                    serve_client(connection, core, metrics, Some(role), &limits).await
                }
            }
            drop(slot);
        });
    }
}

#[derive(Copy, Clone, PartialEq, Eq)]
enum Alpn {
    Peer,
    Client,
    Admin,
}

/// What the verified certificate of an admitted connection allows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Admitted {
    /// A node: every peer message on the connection is from this id
    /// (`None` in the insecure mode, where nothing is verified).
    Node(Option<NodeId>),
    /// Reads, writes and read-only inspection.
    Client,
    /// Also join and leave.
    Admin,
}

/// Decides by the verified certificate whether a connection on `alpn` is
/// allowed: the peer protocol takes node certificates only (and never one
/// naming this node), the client protocol client and admin certificates,
/// the admin protocol client certificates (read-only) and admin ones.
/// Without TLS (`secure` false) everything is allowed, as documented for
/// the insecure mode.
fn admit(
    connection: &quinn::Connection,
    alpn: Alpn,
    me: NodeId,
    secure: bool,
) -> Result<Admitted, String> {
    use crate::certs::Role;
    if !secure {
        return Ok(match alpn {
            Alpn::Peer => Admitted::Node(None),
            _ => Admitted::Admin,
        });
    }
    let identity = match crate::transport::tls::peer_identity(connection) {
        Some(Ok(identity)) => identity,
        Some(Err(e)) => return Err(format!("unusable certificate: {e}")),
        None => return Err("no certificate".into()),
    };
    match (alpn, identity.role) {
        (Alpn::Peer, Role::Node) => {
            let id = NodeId::from_name(&identity.name);
            if id == me {
                return Err(format!(
                    "another node presents this node's own name {:?}: two nodes run with the same certificate or name",
                    identity.name
                ));
            }
            Ok(Admitted::Node(Some(id)))
        }
        (Alpn::Peer, _) => Err(format!(
            "the peer protocol takes node certificates only; this is the {identity}"
        )),
        (_, Role::Node) => Err(format!(
            "a node certificate ({:?}) cannot be used by a client or kvctl: use a client or admin certificate",
            identity.name
        )),
        (_, Role::Admin) => Ok(Admitted::Admin),
        (_, Role::Client) => Ok(Admitted::Client),
    }
}

/// Logs a connection's first dropped frame or refused request at warn and
/// the rest at debug: once per offender, not once per frame.
#[derive(Default)]
struct WarnOnce(std::sync::atomic::AtomicBool);

impl WarnOnce {
    fn first(&self) -> bool {
        !self.0.swap(true, Relaxed)
    }
}

fn dropped(metrics: &Metrics, e: &frame::FrameError) {
    if matches!(
        e,
        frame::FrameError::Stalled(_)
            | frame::FrameError::OverLimit { .. }
            | frame::FrameError::TooLarge(_)
    ) {
        metrics.frames_dropped.fetch_add(1, Relaxed);
    }
}

async fn serve_peer(
    connection: quinn::Connection,
    core: Inbox,
    metrics: Arc<Metrics>,
    sender: Option<NodeId>,
    limits: &Limits,
) {
    // Peers open unidirectional streams only.
    connection.set_max_concurrent_bi_streams(0u32.into());
    let remote = connection.remote_address();
    let read_limits = frame::ReadLimits {
        max_len: crate::transport::MAX_FRAME_BYTES,
        timeout: Some(limits.config.frame_read_timeout()),
        budget: Some(limits.inbound.clone()),
    };
    let warned = Arc::new(WarnOnce::default());
    while let Ok(mut stream) = connection.accept_uni().await {
        let core = core.clone();
        let metrics = metrics.clone();
        let connection = connection.clone();
        let read_limits = read_limits.clone();
        let warned = warned.clone();
        tokio::spawn(async move {
            loop {
                match frame::read_limited::<Envelope, _>(&mut stream, &read_limits).await {
                    Ok(Some((Envelope { from, payload }, size))) => {
                        if let Some(certified) = sender.filter(|&c| c != from) {
                            // The sender of a peer message is the node its
                            // certificate names; a claim to be another is
                            // an impersonation attempt (or a bug): close.
                            warn!(%remote, certified = %certified, claimed = %from, "closed a peer connection: a message claims another sender than its certificate names");
                            connection
                                .close(REFUSED, b"message sender does not match the certificate");
                            return;
                        }
                        let kind = Metrics::kind_index(payload.kind());
                        metrics.peer_bytes_received[kind].fetch_add(size as u64, Relaxed);
                        // Membership has its own way in (see `Inbox`).
                        let inbox = match peers::Lane::of(&payload) {
                            peers::Lane::Membership => &core.membership,
                            _ => &core.main,
                        };
                        if inbox.send(CoreInput::Peer { from, payload }).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        dropped(&metrics, &e);
                        if matches!(e, frame::FrameError::Io(_)) {
                            // The connection went away (restart, idle
                            // timeout, network): not the peer's fault.
                            debug!(%remote, "closed a peer stream: {e}");
                        } else if warned.first() {
                            warn!(%remote, "closed a peer stream: {e} (further ones from this connection logged at debug)");
                        } else {
                            debug!(%remote, "closed a peer stream: {e}");
                        }
                        let _ = stream.stop(2u32.into());
                        return;
                    }
                }
            }
        });
    }
}

/// Serves client requests on one connection, or, with `admin` (the admin
/// protocol), inspection and, for an admin certificate, cluster changes.
///
/// Each stream waits for response budget before reading its request (see
/// `limits`), and holds its response's bytes until the client has them.
async fn serve_client(
    connection: quinn::Connection,
    core: Inbox,
    metrics: Arc<Metrics>,
    admin: Option<Admitted>,
    limits: &Limits,
) {
    // Clients open bidirectional streams only.
    connection.set_max_concurrent_uni_streams(0u32.into());
    let remote = connection.remote_address();
    let read_limits = frame::ReadLimits {
        max_len: limits::CLIENT_FRAME_BYTES,
        timeout: Some(limits.config.frame_read_timeout()),
        budget: Some(limits.inbound.clone()),
    };
    let responses: Arc<ConnResponses> = limits.responses();
    let warned = Arc::new(WarnOnce::default());
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        let core = core.clone();
        let metrics = metrics.clone();
        let admin = admin.clone();
        let read_limits = read_limits.clone();
        let responses = responses.clone();
        let warned = warned.clone();
        tokio::spawn(async move {
            // Before reading the request: a connection whose answers are not
            // read stops being read, and flow control stops its sender.
            let mut ticket = responses.admit().await;
            let started = Instant::now();
            let response = match frame::read_limited::<Call, _>(&mut recv, &read_limits).await {
                Ok(Some((call, _))) if call.request.is_admin() && admin.is_none() => Response::Error(Failure::new(
                    ErrorCode::Forbidden,
                    "admin requests are served on the admin protocol (kvctl), not the client one",
                )),
                Ok(Some((call, _)))
                    if call.request.changes_cluster() && admin != Some(Admitted::Admin) =>
                {
                    Response::Error(Failure::new(
                        ErrorCode::Forbidden,
                        "changing the cluster (join, leave) or its API tokens needs an admin certificate (`gossipkv certs issue --role admin`); this connection's certificate is a client one",
                    ))
                }
                Ok(Some((call, _))) => {
                    let (reply, answer) = oneshot::channel();
                    if core.main.send(CoreInput::Client { call, reply }).await.is_err() {
                        return;
                    }
                    answer
                        .await
                        .unwrap_or_else(|_| {
                            Response::Error(Failure::new(
                                ErrorCode::Internal,
                                "the node is shutting down",
                            ))
                        })
                }
                Ok(None) => return,
                Err(e) => {
                    dropped(&metrics, &e);
                    if warned.first() {
                        warn!(%remote, "refused a client request: {e} (further ones from this connection logged at debug)");
                    } else {
                        debug!(%remote, "refused a client request: {e}");
                    }
                    Response::Error(Failure::new(
                        ErrorCode::BadRequest,
                        format!("bad request: {e}"),
                    ))
                }
            };
            metrics.request_latency.observe(started.elapsed());
            let Ok(bytes) = frame::encode(&response) else {
                return;
            };
            // One copy only from here on.
            drop(response);
            ticket.hold(bytes.len() as u64);
            if send.write_all(&bytes).await.is_ok() {
                drop(bytes);
                if send.finish().is_ok() {
                    // Held until the client acknowledged every byte (QUIC's
                    // send buffer is part of what a slow reader makes us hold).
                    let _ = send.stopped().await;
                }
            }
            drop(ticket);
        });
    }
}
