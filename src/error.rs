//! The library's error type. Every variant names what was wrong and, where
//! it helps, what to do instead.

use crate::crdt::{NodeId, TokenError, ValueKind};
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be opened as a database (missing permissions,
    /// not a redb file, damaged, locked by another process).
    #[error("cannot open store at {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    /// A database that is not a gossipkv store, or lacks its metadata.
    #[error("{path} is not a gossipkv store: {reason}")]
    NotAStore { path: String, reason: String },
    #[error("store format version {found} is not supported by this build (it reads version {supported})")]
    UnsupportedFormat { found: u32, supported: u32 },
    #[error("the store has {stored} partitions but {requested} were requested; the partition count is fixed when a store is created")]
    PartitionCountMismatch { stored: u16, requested: u16 },
    #[error("the store belongs to node {stored} but node {requested} was requested")]
    NodeIdMismatch { stored: NodeId, requested: NodeId },
    #[error("invalid option {name}: {reason}")]
    InvalidOption { name: &'static str, reason: String },
    #[error("invalid key: {0}")]
    InvalidKey(String),
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// The key is live as another kind of value.
    #[error("key {key} holds a {found}, not a {expected}")]
    WrongType {
        key: String,
        expected: ValueKind,
        found: ValueKind,
    },
    #[error("key {key} holds a {kind}, which cannot be deleted: only register and lww keys can be (remove set members one by one)")]
    DeleteUnsupported { key: String, kind: ValueKind },
    #[error("bad causal context token: {0}")]
    BadToken(#[from] TokenError),
    /// A context, entry or version vector claims a write of this node that
    /// it never made: it was forged, or this node's data was lost and its id
    /// reused. Nothing was written.
    #[error("{what} claims write {claimed} of node {node}, which has only issued up to {issued} in that partition")]
    UnissuedWrite {
        what: String,
        node: NodeId,
        claimed: u64,
        issued: u64,
    },
    /// A local write to a partition whose own earlier writes this store no
    /// longer holds (it dropped the partition, e.g. after handing it off).
    /// A new write there would claim to have seen those writes and make
    /// every replica discard them. Nothing was written.
    #[error("partition {partition} is not held here: this store issued writes up to {issued} in it but holds its own writes only up to {held}; sync the partition back from a replica before writing to it")]
    OwnWritesMissing {
        partition: u16,
        held: u64,
        issued: u64,
    },
    #[error("partition {partition} has used up its sequence numbers")]
    SequenceExhausted { partition: u16 },
    #[error("counter {key} would leave the range of a 64-bit signed integer")]
    CounterOverflow { key: String },
    #[error("partition {partition} is out of range: the store has {count} partitions")]
    PartitionOutOfRange { partition: u16, count: u16 },
    /// A remote entry was sent for a partition its key does not hash to.
    #[error("remote entry for key {key} belongs to partition {actual}, not {claimed}")]
    MisroutedEntry {
        key: String,
        claimed: u16,
        actual: u16,
    },
    #[error("remote entry for key {key} is invalid: {reason}")]
    InvalidEntry { key: String, reason: String },
    /// Data read from the database file failed to decode or validate.
    #[error("stored data is corrupt ({what}): {reason}")]
    Corrupt { what: String, reason: String },
    #[error("stores cannot sync: {0}")]
    Incompatible(String),
    #[error("storage error: {0}")]
    Storage(#[from] redb::Error),
    /// The write-ahead log could not be read or written.
    #[error("write-ahead log {path}: {source}")]
    WriteAheadLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// A key as it appears in messages: text where it is printable, escaped
/// bytes where not, cut at 80 characters.
pub(crate) fn show_key(key: &[u8]) -> String {
    const MAX: usize = 80;
    let text: String = key.escape_ascii().to_string();
    if text.len() > MAX {
        format!("\"{}…\"", &text[..MAX])
    } else {
        format!("\"{text}\"")
    }
}
