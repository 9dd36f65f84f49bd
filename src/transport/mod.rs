//! QUIC transport: TLS configuration (mutual TLS against the cluster CA)
//! and the framing of messages on streams.
//!
//! Three ALPNs separate traffic: peer (replication), client (reads and
//! writes) and admin (inspection). A frame is `b"GKV"`, a protocol version
//! byte, a big-endian u32 length, then that many bytes of postcard. Frames
//! above [`MAX_FRAME_BYTES`] are refused before anything is allocated, and a
//! body's buffer grows as its bytes arrive (the node also bounds the time
//! and memory frames being read take: [`frame::read_limited`],
//! `node::limits`). A bad frame ends that stream with an error; the
//! connection and the node go on.

pub mod frame;
pub mod tls;

pub const ALPN_PEER: &[u8] = b"gossipkv-peer/1";
pub const ALPN_CLIENT: &[u8] = b"gossipkv-client/1";
pub const ALPN_ADMIN: &[u8] = b"gossipkv-admin/1";

/// The largest frame accepted: a change chunk is capped at 1 MiB of
/// entries, and a single register value at 4 MiB.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
