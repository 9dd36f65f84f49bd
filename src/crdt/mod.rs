//! The value model: node identities, dots, version vectors, causal contexts,
//! the hybrid logical clock, and the stored [`Entry`](entry::Entry) that
//! combines them with the CRDT values of the `crdts` crate.
//!
//! Invariants this layer keeps (the store and sync rely on them):
//! - every write gets a fresh dot `(origin node, per-partition sequence)`;
//!   a node's sequences in a partition are contiguous and never reused;
//! - an entry's causal context is the join of the clocks of every write it
//!   has incorporated, so it only grows;
//! - merging entries is commutative, associative and idempotent.

mod context;
pub(crate) mod entry;
mod hlc;
mod version_vector;

pub use context::{CausalContext, TokenError};
pub use entry::{Record, Value, ValueKind};
pub use hlc::{HlcTimestamp, HybridClock, SystemClock, WallClock};
pub use version_vector::VersionVector;

use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's identity: the actor of every dot it issues.
///
/// Shown as 16 hex digits. Two stores must never share a node id: dots are
/// only unique per node.
#[derive(Copy, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// A fresh random node id.
    pub fn random() -> Self {
        NodeId(rand::random())
    }

    /// The id of the node named `name` (the name its certificate carries):
    /// a 64-bit hash, so that every node derives a peer's id from the
    /// peer's verified certificate alone, and a name always means the same
    /// writer. Reusing the name of a decommissioned node is safe: a node
    /// writes a partition only once it holds it completely, vector included
    /// (see `Store::writable`), so its new dots follow its old ones.
    pub fn from_name(name: &str) -> Self {
        NodeId(xxhash_rust::xxh3::xxh3_64(
            format!("gossipkv node {name}").as_bytes(),
        ))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl std::str::FromStr for NodeId {
    type Err = std::num::ParseIntError;
    /// Parses the 16-hex-digit form that `Display` prints.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(NodeId)
    }
}

/// One write: the node that made it and its sequence number within the
/// key's partition on that node.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub node: NodeId,
    pub seq: u64,
}

impl Dot {
    pub fn new(node: NodeId, seq: u64) -> Self {
        Dot { node, seq }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.node, self.seq)
    }
}
