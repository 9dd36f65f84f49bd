//! The peer protocol: what one peer frame carries, and the outgoing side
//! (one connection and one ordered stream per peer, fed by a bounded
//! queue; when a peer is slow or away its queue fills and further frames to
//! it are dropped, which the replication core tolerates).

use super::http::watch::WatchMessage;
use super::metrics::Metrics;
use super::reload::LiveTls;
use crate::crdt::NodeId;
use crate::replication::coordinator::{CoordMessage, ReplicateItem};
use crate::replication::message::Message;
use crate::transport::frame;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Frames queued per peer before further ones are dropped.
pub(super) const PEER_QUEUE: usize = 256;

/// What a peer stream carries: the sender's id and one payload.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Envelope {
    pub(super) from: NodeId,
    pub(super) payload: Payload,
}

/// Peer payloads: the replication core's messages, the request
/// coordination between nodes, and held watches (see `http::watch`).
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Payload {
    Core(Message),
    Coord(CoordMessage),
    Watch(WatchMessage),
}

/// Decodes the frames of one peer stream held in memory, as `serve_peer`
/// does; for fuzzing. The count of frames read, or why the stream ends.
#[doc(hidden)]
pub fn decode_peer_frame(mut bytes: &[u8]) -> Result<usize, frame::FrameError> {
    let mut frames = 0;
    while let Some((Envelope { payload, .. }, _)) = frame::read_from_slice(&mut bytes)? {
        let _ = Metrics::kind_index(payload.kind());
        frames += 1;
    }
    Ok(frames)
}

/// A peer frame asking the receiver to merge `entry` as key `key` of
/// `partition`, claiming to come from `from`: what a coordinator sends its
/// co-replicas after a write. For attack tests (a forged sender).
#[doc(hidden)]
pub fn replicate_frame(
    from: NodeId,
    partition: u16,
    key: &[u8],
    entry: Vec<u8>,
) -> Result<Vec<u8>, frame::FrameError> {
    frame::encode(&Envelope {
        from,
        payload: Payload::Coord(CoordMessage::Replicate {
            items: vec![ReplicateItem {
                id: 1,
                partition,
                key: key.to_vec(),
                entry,
                ack: false,
            }],
        }),
    })
}

impl Payload {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Payload::Core(message) => message.kind(),
            Payload::Coord(_) | Payload::Watch(_) => "coordination",
        }
    }
}

/// Which stream of a peer connection a frame goes on. Each lane has its
/// own queue and its own QUIC stream, so membership probes never wait
/// behind replicated writes, nor writes behind a migration's chunks, and a
/// full queue drops only frames of its own lane.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Lane {
    /// Membership (probes, acks, gossip): small, and late means "suspect".
    Membership,
    /// Request coordination: replicated writes, their acks, forwarded calls.
    Requests,
    /// Anti-entropy, migration and layout messages: background, bulky.
    Sync,
}

impl Lane {
    const ALL: [Lane; 3] = [Lane::Membership, Lane::Requests, Lane::Sync];

    pub(super) fn of(payload: &Payload) -> Lane {
        match payload {
            Payload::Core(Message::Membership(_)) => Lane::Membership,
            Payload::Core(_) => Lane::Sync,
            // With the reads they go before (see `http::watch`).
            Payload::Coord(_) | Payload::Watch(_) => Lane::Requests,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Frames queued before further ones are dropped.
    fn queue(self) -> usize {
        match self {
            Lane::Membership | Lane::Sync => PEER_QUEUE,
            // Each frame batches many writes; dropping one fails writes.
            Lane::Requests => 4 * PEER_QUEUE,
        }
    }

    /// QUIC send priority: higher goes first when the connection is busy.
    fn priority(self) -> i32 {
        match self {
            Lane::Membership => 2,
            Lane::Requests => 1,
            Lane::Sync => 0,
        }
    }
}

pub(super) struct Peers {
    pub(super) endpoint: quinn::Endpoint,
    /// The peer client configuration (replaced by a TLS reload), and where
    /// refusals are logged and connections tracked.
    pub(super) tls: Arc<LiveTls>,
    pub(super) queues: HashMap<SocketAddr, [mpsc::Sender<Vec<u8>>; 3]>,
    pub(super) metrics: Arc<Metrics>,
    /// When a full queue was last reported, per peer and lane: a warning
    /// at most every [`DROP_WARNING_EVERY`], the count always.
    pub(super) drop_warned: HashMap<(SocketAddr, usize), std::time::Instant>,
}

/// How often a peer's full queue is reported in the log.
const DROP_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

impl Peers {
    pub(super) fn send(&mut self, to: SocketAddr, lane: Lane, frame: Vec<u8>) {
        let Some(queues) = self.queues.get(&to) else {
            self.spawn_writer(to, lane, frame);
            return;
        };
        match queues[lane.index()].try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.peer_queue_drops[lane.index()]
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let now = std::time::Instant::now();
                match self.drop_warned.get(&(to, lane.index())) {
                    Some(last) if now.duration_since(*last) < DROP_WARNING_EVERY => {
                        debug!(peer = %to, ?lane, "peer queue full: message dropped");
                    }
                    _ => {
                        self.drop_warned.insert((to, lane.index()), now);
                        warn!(peer = %to, ?lane, "the queue to peer {to} is full: frames to it are dropped (it is slow or away; gossipkv_peer_queue_drops_total counts them)");
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(frame)) => {
                self.queues.remove(&to);
                self.spawn_writer(to, lane, frame);
            }
        }
    }

    fn spawn_writer(&mut self, to: SocketAddr, lane: Lane, first: Vec<u8>) {
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        for l in Lane::ALL {
            let (tx, rx) = mpsc::channel::<Vec<u8>>(l.queue());
            senders.push(tx);
            receivers.push(rx);
        }
        let _ = senders[lane.index()].try_send(first);
        let Ok(senders) = <[mpsc::Sender<Vec<u8>>; 3]>::try_from(senders) else {
            return;
        };
        self.queues.insert(to, senders);
        let endpoint = self.endpoint.clone();
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let connecting =
                match endpoint.connect_with(tls.peer_config(), to, crate::certs::SERVER_NAME) {
                    Ok(connecting) => connecting,
                    Err(e) => return debug!(peer = %to, "cannot dial the peer: {e}"),
                };
            let connection = match connecting.await {
                Ok(connection) => connection,
                // Our side refused the peer's certificate, or a timeout.
                Err(e) => return tls.peer_failed(to, &e),
            };
            let _tracked = tls.track(&connection);
            let mut lanes = tokio::task::JoinSet::new();
            for (lane, mut rx) in Lane::ALL.into_iter().zip(receivers) {
                let connection = connection.clone();
                lanes.spawn(async move {
                    let mut stream = connection.open_uni().await.map_err(|e| e.to_string())?;
                    let _ = stream.set_priority(lane.priority());
                    while let Some(frame) = rx.recv().await {
                        stream.write_all(&frame).await.map_err(|e| e.to_string())?;
                    }
                    Ok::<(), String>(())
                });
            }
            // The first lane to fail ends the connection's writers: the
            // next frame to this peer dials afresh.
            let result = match lanes.join_next().await {
                Some(Ok(result)) => result,
                Some(Err(e)) => Err(e.to_string()),
                None => Ok(()),
            };
            lanes.abort_all();
            // The peer refuses our certificate after our side of the
            // handshake completed: that shows as the connection's close.
            match (connection.close_reason(), result) {
                (Some(reason), _) => tls.peer_failed(to, &reason),
                (None, Err(e)) => debug!(peer = %to, "peer stream ended: {e}"),
                (None, Ok(())) => {}
            }
        });
    }
}
