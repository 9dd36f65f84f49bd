//! Messages between replication cores. Postcard-encoded by the transport;
//! every field that came from a peer is checked before use.

use super::layout_state::LayoutState;
use super::tokens::TokenRegistry;
use crate::crdt::VersionVector;
use crate::store::ChangeChunk;
use serde::{Deserialize, Serialize};

/// What a stream of chunks is for: the receiver treats the final chunk
/// accordingly.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamPurpose {
    /// Anti-entropy repair.
    Repair,
    /// Migration of a partition the receiver takes over, in phase 1 or 2.
    Migration { phase: u8 },
    /// The answer to a `FenceRequest` for layout version `layout`.
    Fence { layout: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// A SWIM membership payload (foca's own encoding).
    Membership(Vec<u8>),
    /// Opens an anti-entropy round: one hash over the version vectors of
    /// the partitions the sender believes both hold.
    Digest {
        round: u64,
        layout: LayoutSummary,
        hash: u64,
        /// The sender's API token registry hash (`TokenRegistry::hash`).
        tokens: u64,
    },
    /// The receiver of a digest computed the same hash: nothing to do.
    InSync { round: u64 },
    /// The digest differed: per-partition hashes of the shared partitions.
    PartitionHashes { round: u64, hashes: Vec<(u16, u64)> },
    /// Version vectors of the partitions that differ. The receiver streams
    /// back what the sender lacks and, if `reply`, sends its own vectors so
    /// the sender can do the same in the other direction.
    Versions {
        round: u64,
        versions: Vec<(u16, VersionVector)>,
        reply: bool,
    },
    /// One chunk of a `changes_since` stream; `index` counts from 0 within
    /// the stream, and a receiver applies chunks only in order.
    Chunk {
        stream: u64,
        index: u32,
        purpose: StreamPurpose,
        chunk: ChangeChunk,
    },
    /// The sender takes over `partition` and asks for what `since` lacks.
    MigrateRequest {
        stream: u64,
        partition: u16,
        phase: u8,
        since: VersionVector,
    },
    /// The sender's layout state, newer than the receiver's.
    Layout(LayoutState),
    /// The sender's API token registry, which differs from the receiver's.
    Tokens(TokenRegistry),
    /// The sender is the primary replica of `partition` (the one replica
    /// that applies devices' pushed writes) in layout version `layout`, and
    /// asks for what `since` lacks, sent once the receiver knows that
    /// layout and has committed every write it took before: from then on
    /// the receiver applies no pushed write of the partition. See
    /// `Replica::push_fenced`.
    FenceRequest {
        stream: u64,
        partition: u16,
        layout: u64,
        since: VersionVector,
    },
    /// Sent by a migration source before the chunks of `stream`: what the
    /// stream carries, for progress, rate and ETA on the receiver.
    MigrateStart {
        stream: u64,
        partition: u16,
        entries: u64,
        bytes: u64,
    },
    /// The source of migration `stream` is alive and holds its chunks back
    /// for its migration budget: `bytes_queued` wait.
    MigrateWaiting {
        stream: u64,
        partition: u16,
        bytes_queued: u64,
    },
    /// The receiver of migration `stream` no longer wants it (it took the
    /// partition from another source, or finished): drop what is queued.
    MigrateCancel { stream: u64 },
}

/// Enough of a layout state to tell whether two differ: the versions for
/// people, a hash of the whole state because two layouts proposed
/// concurrently can share a version.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutSummary {
    pub version: u64,
    pub completed: u64,
    pub hash: u64,
}

impl Message {
    /// A short name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Membership(_) => "membership",
            Message::Digest { .. } | Message::InSync { .. } => "digest",
            Message::PartitionHashes { .. } | Message::Versions { .. } => "digest",
            Message::Chunk {
                purpose: StreamPurpose::Repair,
                ..
            } => "repair",
            Message::Chunk {
                purpose: StreamPurpose::Fence { .. },
                ..
            }
            | Message::FenceRequest { .. } => "fence",
            Message::Chunk { .. }
            | Message::MigrateRequest { .. }
            | Message::MigrateStart { .. }
            | Message::MigrateWaiting { .. }
            | Message::MigrateCancel { .. } => "migration",
            Message::Layout(_) | Message::Tokens(_) => "layout",
        }
    }
}
