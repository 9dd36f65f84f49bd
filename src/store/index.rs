//! The change index as readers see it, and how writers add to it.
//!
//! Logically the index is one row (partition, origin, seq) -> key per entry
//! and node in its causal context, at that node's highest dot. It is kept
//! in two tables so that a commit writes it in few places:
//! - `change_log`: rows appended in commit order, in [`LOG_BUCKETS`]
//!   buckets of partitions. A group of writes to keys spread over many
//!   partitions dirties a leaf page per bucket here, where inserting into
//!   `changes` would dirty a page per partition and writer.
//! - `changes` (and `prefix_changes`): rows by partition, what walks read.
//!   Once a bucket holds its share of [`StoreOptions::change_log_rows`], a
//!   commit folds that bucket in (one bucket per commit, so that no commit
//!   pays for the whole log): every page of `changes` it touches then takes
//!   many rows.
//!
//! A row leaves the index when its entry no longer has that dot (a newer
//! write, a purge, a dropped partition). Writers delete such rows from
//! `changes` and `prefix_changes`, but not from the log, which is never
//! searched by dot: a log row is *live* only while its key's entry has its
//! dot among its index dots. Walks check each log row they reach, and the
//! fold every row, so stale log rows cost a read and are never seen. A row can be both in the log and
//! in `changes` (an entry removed and merged back with the same dots);
//! walks yield it once.
//!
//! A walk reads the log's rows of its partition into memory first, from a
//! cache of the log by partition that each read extends with the rows
//! appended since (`LogCache`). Log positions only grow
//! (`META_CHANGE_LOG_NEXT`), and a fold counts itself
//! (`META_CHANGE_LOG_FOLDS`), so a snapshot names which rows it holds.
//!
//! [`StoreOptions::change_log_rows`]: super::StoreOptions::change_log_rows

use super::feed::prefix_hash;
use super::tables::{
    CHANGES, CHANGE_LOG, ENTRIES, META, META_CHANGE_LOG_FOLDS, META_CHANGE_LOG_NEXT, PREFIX_CHANGES,
};
use super::{decode_entry, Store};
use crate::crdt::entry::Entry;
use crate::crdt::{Dot, NodeId, VersionVector};
use crate::error::{Error, Result};
use redb::{ReadOnlyTable, ReadTransaction, ReadableTable, WriteTransaction};
use std::collections::{BTreeMap, HashMap};

/// The table a walk reads beside the log.
enum Main {
    Partition(ReadOnlyTable<(u16, u64, u64), &'static [u8]>),
    Prefix(ReadOnlyTable<(u64, u16, u64, u64), &'static [u8]>, u64),
}

/// One partition's change index (or the part under one indexed prefix),
/// read from one snapshot.
pub(super) struct IndexView {
    main: Main,
    partition: u16,
    /// The log rows of the partition (under the prefix), live or not:
    /// (origin, seq) -> key. A walk checks each it reaches.
    recent: BTreeMap<(u64, u64), Vec<u8>>,
    entries: ReadOnlyTable<&'static [u8], &'static [u8]>,
}

impl IndexView {
    /// `prefix`: an indexed prefix (see `feed::feed_index_prefix`), or
    /// `None` for the whole partition.
    pub(super) fn open(
        txn: &ReadTransaction,
        store: &Store,
        partition: u16,
        prefix: Option<&[u8]>,
    ) -> Result<Self> {
        let main = match prefix {
            Some(p) => Main::Prefix(txn.open_table(PREFIX_CHANGES)?, prefix_hash(p)),
            None => Main::Partition(txn.open_table(CHANGES)?),
        };
        let candidates = store.log_cache().rows(txn, store.partitions, partition)?;
        let recent = candidates
            .into_iter()
            .filter(|(_, _, key)| prefix.is_none_or(|pre| key.starts_with(pre)))
            .map(|(origin, seq, key)| ((origin, seq), key))
            .collect();
        Ok(IndexView {
            main,
            partition,
            recent,
            entries: txn.open_table(ENTRIES)?,
        })
    }

    /// The smallest origin at or after `from` with rows in the partition.
    pub(super) fn first_origin_from(&self, from: u64) -> Result<Option<NodeId>> {
        let partition = self.partition;
        let main = match &self.main {
            Main::Partition(t) => t
                .range((partition, from, 0u64)..=(partition, u64::MAX, u64::MAX))?
                .next()
                .map(|r| r.map(|(k, _)| k.value().1)),
            Main::Prefix(t, p) => t
                .range((*p, partition, from, 0u64)..=(*p, partition, u64::MAX, u64::MAX))?
                .next()
                .map(|r| r.map(|(k, _)| k.value().2)),
        }
        .transpose()?;
        let recent = self.recent.range((from, 0)..).next().map(|(&(o, _), _)| o);
        Ok(match (main, recent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(NodeId))
    }

    /// Calls `visit(seq, key)` for the rows of `origin` from `from_seq` on,
    /// in seq order, each once, until it answers false.
    pub(super) fn walk(
        &self,
        origin: NodeId,
        from_seq: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let mut recent = self
            .recent
            .range((origin.0, from_seq)..=(origin.0, u64::MAX))
            .map(|(&(_, seq), key)| (seq, key.as_slice()))
            .peekable();
        let live = |seq: u64, key: &[u8]| is_live(&self.entries, key, Dot::new(origin, seq));
        let partition = self.partition;
        match &self.main {
            Main::Partition(t) => {
                for row in
                    t.range((partition, origin.0, from_seq)..=(partition, origin.0, u64::MAX))?
                {
                    let (position, key) = row?;
                    let seq = position.value().2;
                    if !recent_before(&mut recent, Some(seq), &live, &mut visit)?
                        || !visit(seq, key.value())?
                    {
                        return Ok(());
                    }
                }
            }
            Main::Prefix(t, p) => {
                let p = *p;
                for row in t.range(
                    (p, partition, origin.0, from_seq)..=(p, partition, origin.0, u64::MAX),
                )? {
                    let (position, key) = row?;
                    let seq = position.value().3;
                    if !recent_before(&mut recent, Some(seq), &live, &mut visit)?
                        || !visit(seq, key.value())?
                    {
                        return Ok(());
                    }
                }
            }
        }
        recent_before(&mut recent, None, &live, &mut visit)?;
        Ok(())
    }

    /// The keys of every row of the partition (a key with several rows
    /// appears once per row).
    pub(super) fn keys(&self, mut visit: impl FnMut(&[u8])) -> Result<()> {
        let mut origin = self.first_origin_from(0)?;
        while let Some(o) = origin {
            self.walk(o, 0, |_, key| {
                visit(key);
                Ok(true)
            })?;
            origin = match o.0.checked_add(1) {
                Some(next) => self.first_origin_from(next)?,
                None => None,
            };
        }
        Ok(())
    }
}

/// Whether `entry`, reached in a walk through origin `via`, goes out there:
/// at the first of its dots `since` lacks (in walk order), so that an entry
/// indexed by several uncovered dots goes out once.
pub(super) fn first_uncovered_is(entry: &Entry, since: &VersionVector, via: NodeId) -> bool {
    entry
        .index_dots()
        .into_iter()
        .find(|&d| !since.covers(d))
        .is_some_and(|d| d.node == via)
}

/// Visits the live log rows in `recent` below `upto` (all for `None`) and
/// skips one at `upto` (the main table's row for the same dot); false once
/// `visit` said stop.
fn recent_before<'a>(
    recent: &mut std::iter::Peekable<impl Iterator<Item = (u64, &'a [u8])>>,
    upto: Option<u64>,
    live: &impl Fn(u64, &[u8]) -> Result<bool>,
    visit: &mut impl FnMut(u64, &[u8]) -> Result<bool>,
) -> Result<bool> {
    while let Some(&(seq, key)) = recent.peek() {
        match upto {
            Some(u) if seq > u => break,
            Some(u) if seq == u => {
                recent.next();
                break;
            }
            _ => {}
        }
        recent.next();
        if live(seq, key)? && !visit(seq, key)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Buckets of the change log: partition `p` is in bucket `p % LOG_BUCKETS`.
pub(super) const LOG_BUCKETS: u16 = 8;

pub(super) fn bucket_of(partition: u16) -> u16 {
    partition % LOG_BUCKETS
}

/// The writer's account of the change log.
#[derive(Copy, Clone, Debug, Default)]
pub(super) struct LogState {
    /// The position of the next row.
    pub(super) next: u64,
    /// Folds so far.
    pub(super) folds: u64,
    /// Rows (live or not) in each bucket.
    pub(super) rows: [u64; LOG_BUCKETS as usize],
}

impl LogState {
    /// Counts the log's rows (at open).
    pub(super) fn read(txn: &WriteTransaction, partitions: u16) -> Result<LogState> {
        let meta = txn.open_table(META)?;
        let mut state = LogState {
            next: meta_u64(&meta, META_CHANGE_LOG_NEXT)?,
            folds: meta_u64(&meta, META_CHANGE_LOG_FOLDS)?,
            rows: Default::default(),
        };
        for row in txn.open_table(CHANGE_LOG)?.iter()? {
            let (at, row) = row?;
            let (bucket, position) = at.value();
            let (p, ..) = row.value();
            check_row(bucket, p, partitions)?;
            state.rows[usize::from(bucket)] += 1;
            state.next = state.next.max(position.saturating_add(1));
        }
        Ok(state)
    }
}

/// A u64 metadata field; 0 when absent.
pub(super) fn meta_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<u64> {
    match meta.get(name)? {
        Some(v) => Ok(u64::from_le_bytes(v.value().try_into().map_err(|_| {
            Error::Corrupt {
                what: "metadata".into(),
                reason: format!("{name} is not 8 bytes"),
            }
        })?)),
        None => Ok(0),
    }
}

/// The change log's rows by partition, read once from a snapshot and
/// extended as the log grows, so that a walk does not scan the whole log.
/// Between two snapshots with the same fold count, the log only gained
/// rows, at positions past the older one's `META_CHANGE_LOG_NEXT`.
#[derive(Default)]
pub(super) struct LogCache {
    folds: u64,
    next: u64,
    by_partition: HashMap<u16, Vec<CachedRow>>,
}

struct CachedRow {
    position: u64,
    origin: u64,
    seq: u64,
    key: Vec<u8>,
}

impl LogCache {
    /// The log rows of `partition` in `txn`'s snapshot, live or not:
    /// (origin, seq, key).
    fn rows(
        &mut self,
        txn: &ReadTransaction,
        partitions: u16,
        partition: u16,
    ) -> Result<Vec<(u64, u64, Vec<u8>)>> {
        let meta = txn.open_table(META)?;
        let next = meta_u64(&meta, META_CHANGE_LOG_NEXT)?;
        let folds = meta_u64(&meta, META_CHANGE_LOG_FOLDS)?;
        if self.folds != folds {
            *self = LogCache {
                folds,
                ..LogCache::default()
            };
        }
        if self.next < next {
            let log = txn.open_table(CHANGE_LOG)?;
            for bucket in 0..LOG_BUCKETS {
                for row in log.range((bucket, self.next)..(bucket, next))? {
                    let (at, row) = row?;
                    let (p, origin, seq, key) = row.value();
                    check_row(bucket, p, partitions)?;
                    self.by_partition.entry(p).or_default().push(CachedRow {
                        position: at.value().1,
                        origin,
                        seq,
                        key: key.to_vec(),
                    });
                }
            }
            self.next = next;
        }
        Ok(self
            .by_partition
            .get(&partition)
            .into_iter()
            .flatten()
            .filter(|r| r.position < next)
            .map(|r| (r.origin, r.seq, r.key.clone()))
            .collect())
    }
}

/// A log row must name a partition of the store, in the bucket it is in.
pub(super) fn check_row(bucket: u16, partition: u16, partitions: u16) -> Result<()> {
    check_partition(partition, partitions)?;
    if bucket_of(partition) != bucket {
        return Err(Error::Corrupt {
            what: "change log".into(),
            reason: format!("a row of partition {partition} is in bucket {bucket}"),
        });
    }
    Ok(())
}

pub(super) fn check_partition(partition: u16, partitions: u16) -> Result<()> {
    if partition >= partitions {
        return Err(Error::Corrupt {
            what: "change log".into(),
            reason: format!("a row names partition {partition} of {partitions}"),
        });
    }
    Ok(())
}

/// Whether a log row for `dot` of `key` is live: its entry still has that
/// dot among its index dots.
pub(super) fn is_live(
    entries: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
    dot: Dot,
) -> Result<bool> {
    let Some(stored) = entries.get(key)? else {
        return Ok(false);
    };
    let entry = decode_entry(key, stored.value())?;
    Ok(entry.index_dots().contains(&dot))
}

#[cfg(test)]
mod tests {
    use super::super::tables::{CHANGE_LOG, META, META_FORMAT};
    use crate::crdt::{NodeId, VersionVector};
    use crate::error::Error;
    use crate::store::{Store, StoreOptions};

    fn listed(store: &Store) -> usize {
        (0..store.partitions())
            .map(|p| {
                store
                    .changes_since(p, &VersionVector::new())
                    .unwrap()
                    .map(|c| c.unwrap().entries.len())
                    .sum::<usize>()
            })
            .sum()
    }

    fn options(log_rows: u64) -> StoreOptions {
        StoreOptions::default()
            .node_id(NodeId(1))
            .partitions(4)
            .change_log_rows(log_rows)
    }

    #[test]
    fn log_rows_survive_a_reopen_and_fold_once_the_log_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // One partition: every row in bucket 0, which folds at 80 / 8.
        let options = || options(80).partitions(1);
        {
            let s = Store::open(&path, options()).unwrap();
            for i in 0..9 {
                s.put(format!("k{i}").as_bytes(), b"v", None).unwrap();
            }
        }
        let s = Store::open(&path, options()).unwrap();
        assert_eq!(listed(&s), 9, "unfolded rows are read after a reopen");
        let log_len = |s: &Store| {
            let txn = redb::ReadableDatabase::begin_read(&s.db).unwrap();
            redb::ReadableTableMetadata::len(&txn.open_table(CHANGE_LOG).unwrap()).unwrap()
        };
        assert_eq!(log_len(&s), 9);
        // Overwrites leave stale rows in the log, never a second listing.
        s.put(b"k0", b"w", None).unwrap();
        assert_eq!(log_len(&s), 0, "the tenth row folds the log");
        assert_eq!(listed(&s), 9);
        s.put(b"k1", b"w", None).unwrap();
        assert_eq!(listed(&s), 9);
    }

    #[test]
    fn a_change_log_position_that_is_not_8_bytes_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path, options(100)).unwrap());
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(super::META_CHANGE_LOG_NEXT, [1u8, 2, 3].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        match Store::open(&path, options(100)) {
            Err(Error::Corrupt { what, reason }) => {
                assert_eq!(what, "metadata");
                assert!(reason.contains("change_log_next"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn a_format_1_store_is_upgraded_and_an_unknown_format_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path, options(0)).unwrap();
            s.put(b"a", b"v", None).unwrap();
        }
        let set_format = |format: u32, drop_log: bool| {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            if drop_log {
                txn.delete_table(CHANGE_LOG).unwrap();
            }
            txn.open_table(META)
                .unwrap()
                .insert(META_FORMAT, format.to_le_bytes().as_slice())
                .unwrap();
            txn.commit().unwrap();
        };
        set_format(1, true);
        {
            let s = Store::open(&path, options(0)).unwrap();
            assert_eq!(listed(&s), 1);
            s.put(b"b", b"v", None).unwrap();
            assert_eq!(listed(&s), 2);
        }
        set_format(3, false);
        match Store::open(&path, options(0)) {
            Err(Error::UnsupportedFormat {
                found: 3,
                supported: 2,
            }) => {}
            other => panic!("expected UnsupportedFormat, got {other:?}"),
        }
    }

    #[test]
    fn a_log_row_of_a_partition_out_of_range_or_in_the_wrong_bucket_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path, options(100)).unwrap());
        for bad in [
            (9u16, "partition 9 of 4"),
            (2, "partition 2 is in bucket 1"),
        ] {
            {
                let db = redb::Database::open(&path).unwrap();
                let txn = db.begin_write().unwrap();
                txn.open_table(CHANGE_LOG)
                    .unwrap()
                    .insert((1, 0), (bad.0, 1u64, 1u64, b"k".as_slice()))
                    .unwrap();
                txn.commit().unwrap();
            }
            match Store::open(&path, options(100)) {
                Err(Error::Corrupt { what, reason }) => {
                    assert_eq!(what, "change log");
                    assert!(reason.contains(bad.1), "{reason}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
    }
}
