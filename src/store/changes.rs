//! Sync primitives: list what another store lacks, apply what it sent, and
//! purge causally stable tombstones.
//!
//! `changes_since(p, since)` walks the change index of partition `p` from
//! `since` onward, origin by origin, so it reads only rows for dots `since`
//! does not cover: time proportional to the answer (plus one seek per origin
//! node), not to the store. It runs in one read snapshot and yields chunks
//! bounded in entries and bytes; the last chunk carries `complete`: the
//! source's version vector at that snapshot.
//!
//! Applying a chunk merges its entries and records their index dots. Only the
//! final chunk lets the receiver raise its version vector to the source's:
//! that is safe once the receiver holds every entry the source had that
//! `since` did not cover, and `since` was the receiver's own vector earlier
//! (vectors only grow). A stream cut short leaves the receiver with the dots
//! it did receive, so the next exchange resumes from there.

use super::index::{first_uncovered_is, IndexView};
use super::tables::*;
use super::write::Writer;
use super::{read_version, Store};
use crate::crdt::entry::Entry;
use crate::crdt::{Dot, NodeId, VersionVector};
use crate::error::{show_key, Error, Result};
use redb::{ReadOnlyTable, ReadTransaction, ReadableDatabase};
use serde::{Deserialize, Serialize};

/// Bounds on one chunk of a change stream.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ChunkLimits {
    pub max_entries: usize,
    /// Encoded key and entry bytes. A single entry larger than this still
    /// goes out, alone in its chunk.
    pub max_bytes: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_entries: 1024,
            max_bytes: 1 << 20,
        }
    }
}

/// One key's entry as it travels between stores: encoded, checked on arrival.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteEntry {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub entry: Vec<u8>,
}

/// A bounded piece of a change stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeChunk {
    pub partition: u16,
    pub entries: Vec<RemoteEntry>,
    /// Set on the last chunk only: the source's version vector of the
    /// partition when the stream began. Apply it only after every earlier
    /// chunk of the same stream, in order.
    pub complete: Option<VersionVector>,
    /// With `complete`: the source's purged vector (see `tables`), which
    /// the receiver takes on, since it now claims those dots too.
    pub purged: Option<VersionVector>,
}

impl ChangeChunk {
    /// Key and entry bytes carried.
    pub fn payload_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.key.len() + e.entry.len())
            .sum()
    }
}

/// What applying a chunk did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Entries that brought writes this store lacked and were merged.
    pub merged: usize,
    /// Entries whose writes this store had already incorporated.
    pub skipped: usize,
}

/// The chunks of `Store::changes_since`, read from one snapshot.
pub struct ChangeStream {
    _txn: ReadTransaction,
    entries: ReadOnlyTable<&'static [u8], &'static [u8]>,
    index: IndexView,
    partition: u16,
    since: VersionVector,
    source: VersionVector,
    purged: VersionVector,
    limits: ChunkLimits,
    /// Next position to read: origin node and sequence; `None` when the
    /// index has been walked to its end.
    cursor: Option<(NodeId, u64)>,
    finished: bool,
}

impl Store {
    /// The entries of `partition` with a dot that `since` does not cover,
    /// in chunks. See the module docs for what applying them guarantees.
    pub fn changes_since(&self, partition: u16, since: &VersionVector) -> Result<ChangeStream> {
        self.changes_since_with(partition, since, ChunkLimits::default())
    }

    pub fn changes_since_with(
        &self,
        partition: u16,
        since: &VersionVector,
        limits: ChunkLimits,
    ) -> Result<ChangeStream> {
        self.check_partition(partition)?;
        self.make_durable()?;
        let mut since = since.clone();
        since.normalize();
        let txn = self.db.begin_read()?;
        let source = read_version(&txn.open_table(VERSIONS)?, partition)?;
        let purged = read_version(&txn.open_table(PURGED)?, partition)?;
        let entries = txn.open_table(ENTRIES)?;
        let index = IndexView::open(&txn, self, partition, None)?;
        let mut stream = ChangeStream {
            _txn: txn,
            entries,
            index,
            partition,
            since,
            source,
            purged,
            limits: ChunkLimits {
                max_entries: limits.max_entries.max(1),
                max_bytes: limits.max_bytes.max(1),
            },
            cursor: None,
            finished: false,
        };
        stream.cursor = stream
            .first_origin_from(0)?
            .map(|n| (n, stream.since.base(n).saturating_add(1)));
        Ok(stream)
    }

    /// Merges a chunk received from another store's `changes_since`.
    /// Everything in it is checked before anything is written; a bad entry
    /// rejects the whole chunk.
    pub fn apply(&self, chunk: &ChangeChunk) -> Result<ApplyReport> {
        let checked = self.check_chunk(chunk)?;
        self.with_write(|w| w.apply_chunk(checked))
    }

    /// Decodes and checks everything in `chunk` that needs no transaction.
    pub(super) fn check_chunk<'c>(&self, chunk: &'c ChangeChunk) -> Result<CheckedChunk<'c>> {
        let partition = chunk.partition;
        self.check_partition(partition)?;
        let mut decoded = Vec::with_capacity(chunk.entries.len());
        for remote in &chunk.entries {
            let key = remote.key.as_slice();
            let entry = self.check_remote(partition, key, &remote.entry)?;
            decoded.push((key, entry));
        }
        let mut complete = chunk.complete.clone();
        if let Some(vv) = &mut complete {
            vv.normalize();
        }
        let mut purged = chunk.purged.clone().filter(|_| complete.is_some());
        if let Some(vv) = &mut purged {
            vv.normalize();
        }
        Ok(CheckedChunk {
            partition,
            decoded,
            complete,
            purged,
        })
    }

    /// Whether `partition` holds any tombstone (what `purge` could drop).
    pub fn has_tombstones(&self, partition: u16) -> Result<bool> {
        self.check_partition(partition)?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TOMBSTONES)?;
        let start: (u16, &[u8]) = (partition, &[]);
        let first = table.range(start..)?.next().transpose()?;
        Ok(first.is_some_and(|(k, _)| k.value().0 == partition))
    }

    /// Removes the tombstones of `partition` whose writes `stable` covers:
    /// `stable` must be covered by every replica's version vector (the
    /// caller computes it, e.g. as the meet of all replicas' vectors).
    /// Returns how many were purged.
    pub fn purge(&self, partition: u16, stable: &VersionVector) -> Result<usize> {
        self.check_partition(partition)?;
        self.with_write(|w| w.purge(partition, stable))
    }
}

impl Store {
    /// Every partition's version vector, read from one snapshot.
    pub fn partition_versions(&self) -> Result<Vec<VersionVector>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(VERSIONS)?;
        (0..self.partitions)
            .map(|p| read_version(&table, p))
            .collect()
    }

    /// Removes everything this store holds of `partition`: its entries,
    /// index rows, tombstones and version vector. Used once a partition has
    /// moved to other replicas that are ready. Returns the entries removed.
    pub fn drop_partition(&self, partition: u16) -> Result<usize> {
        self.check_partition(partition)?;
        self.with_write(|w| w.drop_partition(partition))
    }

    /// Live and tombstoned entries and their encoded bytes in a partition,
    /// counted from the change index (one row per entry and writer).
    pub fn partition_stats(&self, partition: u16) -> Result<PartitionStats> {
        self.check_partition(partition)?;
        let txn = self.db.begin_read()?;
        let index = IndexView::open(&txn, self, partition, None)?;
        let entries = txn.open_table(ENTRIES)?;
        let mut keys = std::collections::BTreeSet::new();
        index.keys(|key| {
            keys.insert(key.to_vec());
        })?;
        let mut stats = PartitionStats::default();
        for key in keys {
            if let Some(bytes) = entries.get(key.as_slice())? {
                stats.entries += 1;
                stats.bytes += (key.len() + bytes.value().len()) as u64;
            }
        }
        Ok(stats)
    }
}

/// Size of a partition's contents.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStats {
    pub entries: u64,
    /// Key and encoded entry bytes: what a full copy would move.
    pub bytes: u64,
}

impl ChangeStream {
    /// The source's version vector of the partition at this stream's snapshot.
    pub fn source_version(&self) -> &VersionVector {
        &self.source
    }

    /// The smallest origin node at or after `from` with rows in the index.
    fn first_origin_from(&self, from: u64) -> Result<Option<NodeId>> {
        self.index.first_origin_from(from)
    }

    fn next_chunk(&mut self) -> Result<ChangeChunk> {
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        while let Some((origin, from_seq)) = self.cursor {
            let mut next_cursor = None;
            let ChangeStream {
                index,
                entries: table,
                since,
                limits,
                partition,
                ..
            } = &*self;
            index.walk(origin, from_seq, |seq, key| {
                if entries.len() >= limits.max_entries || bytes >= limits.max_bytes {
                    next_cursor = Some((origin, seq));
                    return Ok(false);
                }
                if since.covers(crate::crdt::Dot::new(origin, seq)) {
                    return Ok(true);
                }
                let stored = table.get(key)?.ok_or_else(|| Error::Corrupt {
                    what: "change index".into(),
                    reason: format!(
                        "row ({partition}, {origin}, {seq}) names missing key {}",
                        show_key(key)
                    ),
                })?;
                let encoded = stored.value();
                let entry = super::decode_entry(key, encoded)?;
                if !first_uncovered_is(&entry, since, origin) {
                    return Ok(true);
                }
                bytes += key.len() + encoded.len();
                entries.push(RemoteEntry {
                    key: key.to_vec(),
                    entry: encoded.to_vec(),
                });
                Ok(true)
            })?;
            match next_cursor {
                Some(cursor) => {
                    self.cursor = Some(cursor);
                    return Ok(ChangeChunk {
                        partition: self.partition,
                        entries,
                        complete: None,
                        purged: None,
                    });
                }
                None => {
                    self.cursor = match origin.0.checked_add(1) {
                        Some(next) => self
                            .first_origin_from(next)?
                            .map(|n| (n, self.since.base(n).saturating_add(1))),
                        None => None,
                    };
                }
            }
        }
        self.finished = true;
        Ok(ChangeChunk {
            partition: self.partition,
            entries,
            complete: Some(self.source.clone()),
            purged: (!self.purged.is_empty()).then(|| self.purged.clone()),
        })
    }
}

impl Iterator for ChangeStream {
    type Item = Result<ChangeChunk>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        let chunk = self.next_chunk();
        if chunk.is_err() {
            self.finished = true;
        }
        Some(chunk)
    }
}

/// A chunk whose entries are decoded and checked (see `Store::check_chunk`).
pub(super) struct CheckedChunk<'c> {
    partition: u16,
    decoded: Vec<(&'c [u8], Entry)>,
    complete: Option<VersionVector>,
    purged: Option<VersionVector>,
}

impl Writer<'_> {
    /// Merges a checked chunk. The dots it claims are checked before
    /// anything is written, so a refused chunk leaves nothing behind (it
    /// may share a transaction with other writes: `commit_group`).
    pub(super) fn apply_chunk(&mut self, chunk: CheckedChunk<'_>) -> Result<ApplyReport> {
        let CheckedChunk {
            partition,
            decoded,
            complete,
            purged,
        } = chunk;
        for (key, entry) in &decoded {
            let what = || format!("remote entry for key {}", show_key(key));
            self.check_issued(partition, what, &entry.index_dots())?;
        }
        if let Some(vv) = &complete {
            let node = self.node();
            let claimed = Dot::new(node, vv.max_seq(node));
            self.check_issued(
                partition,
                || "the source's version vector".into(),
                &[claimed],
            )?;
        }
        let mut report = ApplyReport::default();
        for (key, entry) in decoded {
            if self.merge_remote(partition, key, entry)? {
                report.merged += 1;
            } else {
                report.skipped += 1;
            }
        }
        if let Some(vv) = &complete {
            self.version_mut(partition).join(vv);
        }
        if let Some(vv) = &purged {
            self.join_purged(partition, vv)?;
        }
        Ok(report)
    }

    /// See [`Store::purge`].
    pub(super) fn purge(&mut self, partition: u16, stable: &VersionVector) -> Result<usize> {
        let mut purged = 0;
        for key in self.tombstone_keys(partition)? {
            let Some(entry) = self.load(&key)? else {
                continue;
            };
            let local = self.version(partition);
            let stable_here = entry
                .index_dots()
                .iter()
                .all(|&d| stable.covers(d) && local.covers(d));
            if entry.is_tombstone() && stable_here {
                self.remove_entry(partition, &key, &entry)?;
                purged += 1;
            }
        }
        if purged > 0 {
            self.join_purged(partition, stable)?;
        }
        Ok(purged)
    }
}
