//! Reconciling two stores in one process with the sync primitives alone:
//! how two devices that were written offline catch up with each other, and
//! the reference the replication protocol follows over the network.
//!
//! For each partition the receiver's version vector goes to the source, the
//! source streams `changes_since` that vector, and the receiver applies the
//! chunks in order. Partitions where the receiver already covers everything
//! the source has are skipped after comparing vectors, so two stores in sync
//! exchange nothing else.

use crate::error::{Error, Result};
use crate::store::{ChunkLimits, Store};

/// What a sync moved.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Partitions whose vectors differed and were streamed.
    pub partitions: u64,
    pub chunks: u64,
    /// Entries sent (including ones the receiver turned out to have).
    pub entries: u64,
    /// Key and entry bytes sent.
    pub bytes: u64,
    /// Entries that brought the receiver something new.
    pub merged: u64,
}

impl SyncReport {
    fn add(&mut self, other: SyncReport) {
        self.partitions += other.partitions;
        self.chunks += other.chunks;
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.merged += other.merged;
    }
}

/// Brings `to` up to date with `from` for one partition.
pub fn pull_partition(
    from: &Store,
    to: &Store,
    partition: u16,
    limits: ChunkLimits,
) -> Result<SyncReport> {
    check_compatible(from, to)?;
    let since = to.partition_version(partition)?;
    if since.dominates(&from.partition_version(partition)?) {
        return Ok(SyncReport::default());
    }
    let mut report = SyncReport {
        partitions: 1,
        ..SyncReport::default()
    };
    for chunk in from.changes_since_with(partition, &since, limits)? {
        let chunk = chunk?;
        report.chunks += 1;
        report.entries += chunk.entries.len() as u64;
        report.bytes += chunk.payload_bytes() as u64;
        report.merged += to.apply(&chunk)?.merged as u64;
    }
    Ok(report)
}

/// Brings `to` up to date with everything `from` has.
pub fn pull(from: &Store, to: &Store) -> Result<SyncReport> {
    check_compatible(from, to)?;
    let mut report = SyncReport::default();
    for partition in 0..from.partitions() {
        report.add(pull_partition(from, to, partition, ChunkLimits::default())?);
    }
    Ok(report)
}

/// Two-way sync: afterwards both stores hold the same data.
pub fn sync(a: &Store, b: &Store) -> Result<SyncReport> {
    let mut report = pull(a, b)?;
    report.add(pull(b, a)?);
    Ok(report)
}

fn check_compatible(a: &Store, b: &Store) -> Result<()> {
    if a.partitions() != b.partitions() {
        return Err(Error::Incompatible(format!(
            "one store has {} partitions, the other {}",
            a.partitions(),
            b.partitions()
        )));
    }
    if a.node_id() == b.node_id() {
        return Err(Error::Incompatible(format!(
            "both stores have node id {}; every store needs its own",
            a.node_id()
        )));
    }
    Ok(())
}
