//! Resource bounds: what a peer or client can make the node hold.
//!
//! Configured by the `[limits]` table of the config file ([`LimitsConfig`],
//! every field optional, defaults below), enforced here:
//!
//! - **Connections**: at most `max_connections` at once, counted from before
//!   the handshake (an attempt beyond it is refused with QUIC's
//!   CONNECTION_REFUSED), and at most `max_connections_per_identity` per
//!   identity: the SHA-256 of the verified leaf certificate, or the remote IP
//!   in insecure mode. A connection over the identity cap is closed with a
//!   reason the client can read. A [`ConnectionSlot`] holds the count and
//!   gives it back when dropped.
//! - **Streams**: QUIC itself caps the concurrent streams a remote may open
//!   (`client_streams_per_connection` bidirectional ones on client and admin
//!   connections, `peer_streams_per_connection` unidirectional ones on peer
//!   connections, none of the other kind). Data a remote sent that the node
//!   has not read stays within the QUIC receive windows:
//!   [`STREAM_RECEIVE_WINDOW`] per stream, [`CONNECTION_RECEIVE_WINDOW`] per
//!   connection.
//! - **Frames being read** ([`crate::transport::frame::read_limited`]): a
//!   frame's whole announced length is reserved from one node-wide budget of
//!   `inbound_frame_bytes_total` bytes before its body is read (a reader
//!   waits for the budget holding nothing, so two big frames cannot hold
//!   halves of it and wait for each other); the buffer then grows as bytes
//!   arrive, never to the announced length at once. A frame has
//!   `frame_read_timeout_ms` from its first byte to its last, budget waits
//!   excluded; a stalled frame ends its stream and frees its buffer. A client
//!   request frame may be at most [`CLIENT_FRAME_BYTES`], a peer frame
//!   [`MAX_FRAME_BYTES`].
//! - **Responses** ([`ConnResponses`]): a client stream first waits for
//!   response budget and only then reads its request, so a connection whose
//!   answers are not read stops having its requests read, and QUIC flow
//!   control stops its sender. A response's encoded bytes are held from the
//!   moment it is encoded until the client acknowledged all of them
//!   (`SendStream::stopped`), which covers the QUIC send buffer too.
//!
//! The response bound. A stream is admitted when its connection has fewer
//! requests in flight than its window (1, growing by one per answered
//! request, so a fresh connection learns its response sizes before running
//! many at once) and either holds nothing (then one response, of any size,
//! always gets through, so every connection is served) or its held bytes,
//! the estimates reserved for its requests in flight and one more estimate
//! fit in `response_bytes_per_connection`, and the node's the same in
//! `response_bytes_total`. The estimate is the largest recent response of
//! the connection (it decays by 1/8 per answer, floor 4 KiB, start 1 MiB).
//! Hence, with L the largest response (at most [`MAX_FRAME_BYTES`]):
//! response bytes held by a connection <= `response_bytes_per_connection` +
//! L · (requests admitted on an underestimate, at most its window); by the
//! node <= `response_bytes_total` + connections · L in the worst case
//! (every connection holding the one response the empty rule lets
//! through). With the defaults and a client that keeps asking for 4 MiB
//! values without reading, a connection holds at most 8 MiB.
//!
//! Nothing waits for budget while holding budget: a stream waits for
//! response budget before reading its request (holding nothing), and reads
//! its request holding only a response reservation, which is released by
//! the client reading, never by another stream's admission.
//!
//! Refusals and dropped frames are logged once per offender (identity, or
//! connection for frames), and counted in the metrics.

use super::metrics::Metrics;
use crate::store::MAX_VALUE_BYTES;
use crate::transport::MAX_FRAME_BYTES;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

/// The largest client request frame: a value, its key and a causal context.
pub const CLIENT_FRAME_BYTES: usize = MAX_VALUE_BYTES + 1024 * 1024;

const MIB: u64 = 1024 * 1024;
/// Unread bytes QUIC buffers per stream and per connection (the server
/// side). quinn's default per connection is unbounded; these bound what
/// streams waiting for response budget can make the node buffer, and still
/// allow 4 MiB / RTT per connection (4 GB/s on a 1 ms LAN).
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;
pub const CONNECTION_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;
/// The first response estimate of a connection.
const FIRST_ESTIMATE: u64 = MIB;
/// The smallest estimate (a response frame is never near zero bytes).
const MIN_ESTIMATE: u64 = 4 * 1024;

/// The `[limits]` table. Every field has a default.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections at once, all protocols (default 1024).
    pub max_connections: usize,
    /// Connections at once per certificate (or IP, insecure) (default 32).
    pub max_connections_per_identity: usize,
    /// Concurrent request streams per client or admin connection (default 16).
    pub client_streams_per_connection: u32,
    /// Concurrent streams per peer connection (default 8).
    pub peer_streams_per_connection: u32,
    /// Response bytes held per client connection (default 8 MiB).
    pub response_bytes_per_connection: u64,
    /// Response bytes held for all client connections (default 128 MiB).
    pub response_bytes_total: u64,
    /// Time from a frame's first byte to its last (default 10000 ms).
    pub frame_read_timeout_ms: u64,
    /// Bytes of frames being read, all connections (default 256 MiB).
    pub inbound_frame_bytes_total: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1024,
            max_connections_per_identity: 32,
            client_streams_per_connection: 16,
            peer_streams_per_connection: 8,
            response_bytes_per_connection: 8 * MIB,
            response_bytes_total: 128 * MIB,
            frame_read_timeout_ms: 10_000,
            inbound_frame_bytes_total: 256 * MIB,
        }
    }
}

/// Why a `[limits]` value is refused: `(field, reason)`.
pub type LimitError = (&'static str, String);

impl LimitsConfig {
    /// Checks ranges; the error names the field (`limits.NAME`).
    pub fn validate(&self) -> Result<(), LimitError> {
        fn range(
            field: &'static str,
            value: u64,
            min: u64,
            max: u64,
            unit: &str,
        ) -> Result<(), LimitError> {
            if value < min || value > max {
                return Err((
                    field,
                    format!("{value} is not between {min} and {max}{unit}"),
                ));
            }
            Ok(())
        }
        range(
            "limits.max_connections",
            self.max_connections as u64,
            1,
            1_000_000,
            "",
        )?;
        range(
            "limits.max_connections_per_identity",
            self.max_connections_per_identity as u64,
            1,
            self.max_connections as u64,
            " (max_connections)",
        )?;
        range(
            "limits.client_streams_per_connection",
            self.client_streams_per_connection.into(),
            1,
            1024,
            "",
        )?;
        range(
            "limits.peer_streams_per_connection",
            self.peer_streams_per_connection.into(),
            1,
            1024,
            "",
        )?;
        range(
            "limits.response_bytes_total",
            self.response_bytes_total,
            MIB,
            1 << 40,
            " bytes",
        )?;
        range(
            "limits.response_bytes_per_connection",
            self.response_bytes_per_connection,
            64 * 1024,
            self.response_bytes_total,
            " bytes (response_bytes_total)",
        )?;
        range(
            "limits.frame_read_timeout_ms",
            self.frame_read_timeout_ms,
            100,
            3_600_000,
            " ms",
        )?;
        // A frame reserves its whole length: the budget must fit the largest.
        range(
            "limits.inbound_frame_bytes_total",
            self.inbound_frame_bytes_total,
            MAX_FRAME_BYTES as u64,
            // tokio's semaphore holds at most usize::MAX >> 3 permits.
            1 << 40,
            " bytes",
        )?;
        Ok(())
    }

    pub fn frame_read_timeout(&self) -> Duration {
        Duration::from_millis(self.frame_read_timeout_ms)
    }

    /// The server's QUIC transport: `base` with the stream caps and the
    /// receive windows (what a remote may send that the node has not read).
    pub fn transport(&self, mut base: quinn::TransportConfig) -> quinn::TransportConfig {
        base.max_concurrent_bidi_streams(self.client_streams_per_connection.into());
        base.max_concurrent_uni_streams(self.peer_streams_per_connection.into());
        base.stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW));
        base.receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
        base
    }
}

/// Who a connection is, for the per-identity cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// SHA-256 of the verified leaf certificate.
    Certificate([u8; 32]),
    /// The remote IP (insecure mode: no certificate).
    Ip(IpAddr),
}

impl Identity {
    pub fn of(connection: &quinn::Connection) -> Identity {
        let leaf = connection
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().map(|c| c.as_ref().to_vec()));
        match leaf {
            Some(der) => {
                let digest = ring::digest::digest(&ring::digest::SHA256, &der);
                let mut hash = [0u8; 32];
                hash.copy_from_slice(digest.as_ref());
                Identity::Certificate(hash)
            }
            None => Identity::Ip(connection.remote_address().ip()),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Certificate(hash) => {
                write!(f, "certificate sha256:")?;
                for b in &hash[..8] {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
            Identity::Ip(ip) => write!(f, "address {ip}"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent across a panic (plain counters).
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node's runtime accounting.
pub struct Limits {
    pub config: LimitsConfig,
    connections: Mutex<ConnectionCounts>,
    responses: Arc<NodeResponses>,
    /// Bytes of frames being read (permits are bytes).
    pub inbound: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct ConnectionCounts {
    total: usize,
    per_identity: HashMap<Identity, usize>,
    /// Identities refused since their count was last zero (logged once).
    warned: HashSet<Identity>,
    /// Whether the node-wide refusal was logged since it was last below.
    warned_total: bool,
}

/// What the caller logs about a refusal: only the first per offender.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Log this one (first since the offender was last under the cap).
    First(String),
    Again(String),
}

impl Limits {
    pub fn new(config: LimitsConfig, metrics: Arc<Metrics>) -> Arc<Limits> {
        // Validated to at most 2^40, which fits tokio's permit limit.
        let inbound = (config.inbound_frame_bytes_total as usize).min(Semaphore::MAX_PERMITS);
        Arc::new(Limits {
            responses: Arc::new(NodeResponses {
                total: config.response_bytes_total,
                per_connection: config.response_bytes_per_connection,
                window: config.client_streams_per_connection,
                held: Mutex::new(Held::default()),
                notify: Notify::new(),
                metrics: metrics.clone(),
            }),
            config,
            connections: Mutex::default(),
            inbound: Arc::new(Semaphore::new(inbound)),
            metrics,
        })
    }

    /// A slot under `max_connections`, taken before the handshake.
    pub fn open(self: &Arc<Self>) -> Result<ConnectionSlot, Refusal> {
        let mut counts = lock(&self.connections);
        if counts.total >= self.config.max_connections {
            self.metrics.connections_refused.fetch_add(1, Relaxed);
            let reason = format!(
                "too many connections to this node (limit {})",
                self.config.max_connections
            );
            let first = !std::mem::replace(&mut counts.warned_total, true);
            return Err(if first {
                Refusal::First(reason)
            } else {
                Refusal::Again(reason)
            });
        }
        counts.total += 1;
        Ok(ConnectionSlot {
            limits: self.clone(),
            identity: None,
        })
    }

    /// Counts the slot against `identity`'s cap, once the handshake told who
    /// it is. On refusal the slot is given back (dropped).
    pub fn identify(&self, slot: &mut ConnectionSlot, identity: Identity) -> Result<(), Refusal> {
        let mut counts = lock(&self.connections);
        let count = counts.per_identity.entry(identity).or_default();
        if *count >= self.config.max_connections_per_identity {
            self.metrics.connections_refused.fetch_add(1, Relaxed);
            let reason = format!(
                "too many connections from this identity (limit {})",
                self.config.max_connections_per_identity
            );
            return Err(if counts.warned.insert(identity) {
                Refusal::First(reason)
            } else {
                Refusal::Again(reason)
            });
        }
        *count += 1;
        slot.identity = Some(identity);
        Ok(())
    }

    /// Response accounting for one new client connection.
    pub fn responses(&self) -> Arc<ConnResponses> {
        Arc::new(ConnResponses {
            node: self.responses.clone(),
            state: Mutex::new(ConnState {
                estimate: FIRST_ESTIMATE,
                ..ConnState::default()
            }),
            notify: Notify::new(),
        })
    }

    /// Connections counted now (for tests and status).
    pub fn connections(&self) -> usize {
        lock(&self.connections).total
    }
}

/// One connection's place under the caps; given back on drop.
pub struct ConnectionSlot {
    limits: Arc<Limits>,
    identity: Option<Identity>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = lock(&self.limits.connections);
        counts.total = counts.total.saturating_sub(1);
        if counts.total < self.limits.config.max_connections {
            counts.warned_total = false;
        }
        if let Some(identity) = self.identity {
            let left = match counts.per_identity.get_mut(&identity) {
                Some(count) => {
                    *count = count.saturating_sub(1);
                    *count
                }
                None => 0,
            };
            if left == 0 {
                counts.per_identity.remove(&identity);
                counts.warned.remove(&identity);
            }
        }
    }
}

#[derive(Default)]
struct Held {
    held: u64,
    reserved: u64,
}

/// The node-wide response budget.
struct NodeResponses {
    total: u64,
    per_connection: u64,
    /// The largest window (the connection's stream cap).
    window: u32,
    held: Mutex<Held>,
    notify: Notify,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct ConnState {
    held: u64,
    reserved: u64,
    in_flight: u32,
    answered: u32,
    estimate: u64,
}

/// One client connection's response accounting.
pub struct ConnResponses {
    node: Arc<NodeResponses>,
    state: Mutex<ConnState>,
    notify: Notify,
}

impl ConnResponses {
    /// Waits until this connection may take one more request (see the
    /// module doc), and reserves its estimate.
    pub async fn admit(self: &Arc<Self>) -> Ticket {
        loop {
            // Created before the check: `notify_waiters` reaches them even
            // unpolled, so no release between check and wait is missed.
            let node_freed = self.node.notify.notified();
            let conn_freed = self.notify.notified();
            {
                let mut node = lock(&self.node.held);
                let mut conn = lock(&self.state);
                let window = conn.answered.saturating_add(1).min(self.node.window);
                let empty = conn.held + conn.reserved == 0;
                let fits = conn.held + conn.reserved + conn.estimate <= self.node.per_connection
                    && node.held + node.reserved + conn.estimate <= self.node.total;
                if conn.in_flight < window && (empty || fits) {
                    let reserved = conn.estimate;
                    conn.in_flight += 1;
                    conn.reserved += reserved;
                    node.reserved += reserved;
                    return Ticket {
                        conn: self.clone(),
                        reserved,
                        held: 0,
                        in_flight: true,
                    };
                }
            }
            tokio::select! {
                () = node_freed => {}
                () = conn_freed => {}
            }
        }
    }
}

/// A request's share of the response budget: its estimate until answered,
/// then its response's bytes until dropped (after the client read them).
pub struct Ticket {
    conn: Arc<ConnResponses>,
    reserved: u64,
    held: u64,
    in_flight: bool,
}

impl Ticket {
    /// The response is encoded: hold its `bytes` instead of the estimate.
    pub fn hold(&mut self, bytes: u64) {
        let node = &self.conn.node;
        {
            let mut held = lock(&node.held);
            let mut conn = lock(&self.conn.state);
            held.reserved -= self.reserved;
            conn.reserved -= self.reserved;
            held.held += bytes;
            conn.held += bytes;
            if self.in_flight {
                conn.in_flight -= 1;
                conn.answered = conn.answered.saturating_add(1);
                self.in_flight = false;
            }
            conn.estimate = bytes
                .max(conn.estimate - conn.estimate / 8)
                .max(MIN_ESTIMATE);
            node.metrics.response_bytes_held.store(held.held, Relaxed);
        }
        self.reserved = 0;
        self.held = bytes;
        // A smaller response than estimated frees room.
        node.notify.notify_waiters();
        self.conn.notify.notify_waiters();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let node = &self.conn.node;
        {
            let mut held = lock(&node.held);
            let mut conn = lock(&self.conn.state);
            held.reserved -= self.reserved;
            conn.reserved -= self.reserved;
            held.held -= self.held;
            conn.held -= self.held;
            if self.in_flight {
                conn.in_flight -= 1;
            }
            node.metrics.response_bytes_held.store(held.held, Relaxed);
        }
        node.notify.notify_waiters();
        self.conn.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: LimitsConfig) -> Arc<Limits> {
        Limits::new(config, Arc::new(Metrics::default()))
    }

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_field() {
        LimitsConfig::default().validate().unwrap();
        type Change = fn(&mut LimitsConfig);
        let cases: [(Change, &str); 5] = [
            (|c| c.max_connections = 0, "limits.max_connections"),
            (
                |c| c.max_connections_per_identity = 2000,
                "limits.max_connections_per_identity",
            ),
            (
                |c| c.response_bytes_per_connection = c.response_bytes_total + 1,
                "limits.response_bytes_per_connection",
            ),
            (
                |c| c.inbound_frame_bytes_total = 1024,
                "limits.inbound_frame_bytes_total",
            ),
            (
                |c| c.frame_read_timeout_ms = 0,
                "limits.frame_read_timeout_ms",
            ),
        ];
        for (change, field) in cases {
            let mut config = LimitsConfig::default();
            change(&mut config);
            assert_eq!(config.validate().unwrap_err().0, field);
        }
    }

    #[test]
    fn connection_caps_count_and_warn_once() {
        let limits = limits(LimitsConfig {
            max_connections: 3,
            max_connections_per_identity: 2,
            ..LimitsConfig::default()
        });
        let a = Identity::Ip([10, 0, 0, 1].into());
        let b = Identity::Ip([10, 0, 0, 2].into());
        let mut slots = Vec::new();
        for _ in 0..2 {
            let mut slot = limits.open().unwrap();
            limits.identify(&mut slot, a).unwrap();
            slots.push(slot);
        }
        let mut third = limits.open().unwrap();
        assert!(matches!(
            limits.identify(&mut third, a),
            Err(Refusal::First(_))
        ));
        assert!(matches!(
            limits.identify(&mut third, a),
            Err(Refusal::Again(_))
        ));
        limits.identify(&mut third, b).unwrap();
        assert!(matches!(limits.open(), Err(Refusal::First(_))));
        assert!(matches!(limits.open(), Err(Refusal::Again(_))));
        drop(third);
        assert_eq!(limits.connections(), 2);
        // Below the cap again: the next refusal is logged again.
        let _fourth = limits.open().unwrap();
        assert!(matches!(limits.open(), Err(Refusal::First(_))));
        drop(slots);
        let mut again = limits.open().unwrap();
        limits.identify(&mut again, a).unwrap();
    }

    #[tokio::test]
    async fn responses_wait_for_budget_and_one_always_gets_through() {
        let limits = limits(LimitsConfig {
            response_bytes_per_connection: 8 * MIB,
            response_bytes_total: 16 * MIB,
            ..LimitsConfig::default()
        });
        let conn = limits.responses();
        // A fresh connection runs one request at a time until answered.
        let mut first = conn.admit().await;
        let blocked = tokio::time::timeout(Duration::from_millis(50), conn.admit()).await;
        assert!(blocked.is_err(), "a second request before the first answer");
        // An oversized response is held; nothing more until it is read.
        first.hold(20 * MIB);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), conn.admit())
                .await
                .is_err()
        );
        // Another connection holding nothing still gets one through.
        let other = limits.responses();
        let mut served = other.admit().await;
        served.hold(4 * MIB);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), other.admit())
                .await
                .is_err()
        );
        // The client read the big one: the waiting connection goes on.
        let waiting = tokio::spawn({
            let conn = conn.clone();
            async move { conn.admit().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let mut next = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once the held response was read")
            .unwrap();
        next.hold(4 * MIB);
        // Its estimate is now 20 MiB - 1/8: a second does not fit 8 MiB.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), conn.admit())
                .await
                .is_err()
        );
        drop((next, served));
        let state = lock(&limits.responses.held);
        assert_eq!((state.held, state.reserved), (0, 0));
    }
}
