//! The redb tables of a store. See ARCHITECTURE.md, "Store layout".
//!
//! - `meta`: format version, node id, partition count, hash scheme, HLC.
//! - `entries`: user key -> encoded [`Entry`](crate::crdt::entry::Entry).
//!   Ordered by key, which gives prefix iteration.
//! - `changes`: (partition, origin node, seq) -> user key. One row per
//!   entry and node in its causal context, at that node's highest dot. A
//!   node's writes append at the end of its range.
//! - `change_log`: (bucket, position) -> (partition, origin, seq, user
//!   key): rows of the change index not yet folded into `changes`, in
//!   commit order within each of a few buckets of partitions. Rows whose
//!   entry lost that dot are left here and skipped (see `index.rs`).
//! - `prefix_changes`: (hash of a prefix, partition, origin node, seq) ->
//!   user key. The rows of `changes` again, once per `/`-terminated prefix
//!   of the key (its first few): what lets a change feed for a prefix read
//!   only the changes under it (see `feed.rs`). Hashed, so that rows are
//!   fixed-width; readers check the key against the prefix, so a collision
//!   costs reads, never a wrong answer.
//! - `partition_versions`: partition -> encoded version vector.
//! - `tombstones`: (partition, user key) for deleted keys awaiting purge.
//! - `purged_versions`: partition -> a version vector covering every dot of
//!   every tombstone purged there, here or on the replica a sync came from
//!   (the join of the stable vectors purges used): what lets the change
//!   feed tell a reader it may have missed deletes.
//! - `devices`: device id -> encoded `DeviceRecord`: the node-local device
//!   ledger (see `devices.rs`), outside every invariant below.
//!
//! Invariant: every write commits the entry, its change index rows (in
//! `change_log`, or folded into `changes`), its `tombstones` row and its
//! partition's version vector in one transaction; `changes` holds only
//! live rows; `prefix_changes` holds exactly the rows of `changes` under
//! each indexed prefix of their key.

use redb::TableDefinition;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const ENTRIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("entries");
pub(crate) const CHANGES: TableDefinition<(u16, u64, u64), &[u8]> = TableDefinition::new("changes");
/// A `change_log` key: (bucket, position).
pub(crate) type LogAt = (u16, u64);
/// A `change_log` row: (partition, origin, seq, key).
pub(crate) type LogRow = (u16, u64, u64, &'static [u8]);
pub(crate) const CHANGE_LOG: TableDefinition<LogAt, LogRow> = TableDefinition::new("change_log");
pub(crate) const PREFIX_CHANGES: TableDefinition<(u64, u16, u64, u64), &[u8]> =
    TableDefinition::new("prefix_changes");
pub(crate) const VERSIONS: TableDefinition<u16, &[u8]> = TableDefinition::new("partition_versions");
/// partition -> the highest sequence this node issued there before it
/// dropped the partition: new writes continue above it, so a dot is never
/// reused even after the partition's data and version vector are gone.
pub(crate) const ISSUED_FLOOR: TableDefinition<u16, u64> = TableDefinition::new("issued_floor");
pub(crate) const PURGED: TableDefinition<u16, &[u8]> = TableDefinition::new("purged_versions");
pub(crate) const DEVICES: TableDefinition<u64, &[u8]> = TableDefinition::new("devices");
pub(crate) const TOMBSTONES: TableDefinition<(u16, &[u8]), ()> = TableDefinition::new("tombstones");

pub(crate) const META_FORMAT: &str = "format";
pub(crate) const META_NODE_ID: &str = "node_id";
pub(crate) const META_PARTITIONS: &str = "partitions";
pub(crate) const META_HASH: &str = "hash";
pub(crate) const META_HLC: &str = "hlc";
/// The writer epoch: local writes get dots of `writer_id(node, epoch)`
/// (absent: 0, the node id itself). Raised after an unclean close that may
/// have let uncommitted entries leave the store (see `META_EXPOSED`).
pub(crate) const META_WRITER_EPOCH: &str = "writer_epoch";
/// Present from before the first entry left this store ahead of its
/// durable commit (`Store::commit_group_exposed`) until a clean close
/// (`Store::close`). Found at open, it means a crash may have lost writes
/// other replicas hold, so the store takes a new writer epoch.
pub(crate) const META_EXPOSED: &str = "exposed";
/// Present once `prefix_changes` holds every row (stores made before it
/// existed get it built on open).
pub(crate) const META_FEED_INDEX: &str = "feed_index";
/// The generation of the write-ahead log that continues this file's
/// last durable commit (absent: 0; see `wal.rs`).
pub(crate) const META_WAL_GENERATION: &str = "wal_generation";

/// The position the next `change_log` row takes (written by each commit
/// that appends rows): positions never repeat (see `index.rs`).
pub(crate) const META_CHANGE_LOG_NEXT: &str = "change_log_next";
/// How many times a bucket of `change_log` was folded (see `index.rs`).
pub(crate) const META_CHANGE_LOG_FOLDS: &str = "change_log_folds";

/// Version of the store's file layout. 2: the change log. A format-1 store
/// is upgraded on open (it has no log rows); builds that know only format 1
/// refuse a format-2 store, whose index they would read without the log.
pub(crate) const FORMAT_VERSION: u32 = 2;
/// The older layouts this build opens and upgrades.
pub(crate) const UPGRADABLE_FORMATS: [u32; 1] = [1];
