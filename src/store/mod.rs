//! The local store: one redb database holding a node's entries, the change
//! index, per-partition version vectors and metadata.
//!
//! Reads run in redb read transactions and never wait for writers. Writes
//! (local ops and applied remote entries) are serialized: a write takes the
//! writer lock, which holds the in-memory copy of every partition's version
//! vector, for the length of its redb transaction, and publishes the updated
//! vectors only after the commit succeeds.

mod changes;
mod devices;
mod feed;
mod group;
mod index;
mod partition;
mod tables;
pub mod wal;
pub(crate) mod write;

pub use changes::{
    ApplyReport, ChangeChunk, ChangeStream, ChunkLimits, PartitionStats, RemoteEntry,
};
pub use devices::DeviceRecord;
pub use feed::{feed_index_prefix, FeedPage, MAX_FEED_DEPTH};
pub use group::{GroupOutcome, GroupWrite, MergedView};
pub use partition::{partition_of, DEFAULT_PARTITIONS, HASH_SCHEME};
pub use write::{Batch, Op};

use crate::crdt::entry::Entry;
use crate::crdt::{
    CausalContext, HlcTimestamp, HybridClock, NodeId, Record, SystemClock, ValueKind,
    VersionVector, WallClock,
};
use crate::error::{show_key, Error, Result};
use redb::{Database, ReadableDatabase, ReadableTable};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tables::*;

/// The largest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 8 * 1024;
/// The largest register value or set member accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 4 * 1024 * 1024;

/// Default of [`StoreOptions::change_log_rows`].
pub const DEFAULT_CHANGE_LOG_ROWS: u64 = 8192;

/// When a commit is on disk.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is flushed to disk before it returns (the default).
    #[default]
    Immediate,
    /// Commits are not flushed: a crash may lose the latest commits (the
    /// store reopens at an earlier consistent state) but never corrupts it.
    /// Commits are flushed before entries leave the store (`changes_since`,
    /// `entry_bytes`), so no other replica ever holds a write a crash lost.
    /// Contexts returned to clients are not covered: a client may hold a
    /// context naming a lost write whose dot the store issues again.
    Buffered,
}

/// How to open a store.
#[derive(Clone)]
pub struct StoreOptions {
    /// This store's node id. A new store gets a random one if `None`; an
    /// existing store must match if `Some`.
    pub node_id: Option<NodeId>,
    /// Partition count of a new store (default 256); an existing store must
    /// match if `Some`.
    pub partitions: Option<u16>,
    pub durability: Durability,
    /// redb page cache size in bytes (`None`: redb's default).
    pub cache_bytes: Option<usize>,
    /// Wall-clock source for the hybrid logical clock.
    pub clock: Arc<dyn WallClock>,
    /// Verify every page checksum of an existing file when it is opened
    /// (default `true`). A file damaged outside redb (disk fault, a stray
    /// write, a bad copy) then fails to open with [`Error::Corrupt`]
    /// instead of being trusted and making the first read of a damaged
    /// page panic. It reads the whole file once, so opening costs time in
    /// proportion to the store's size.
    pub verify_on_open: bool,
    /// Change index rows the change log gathers before commits fold them
    /// into the per-partition index, a bucket at a time (see `index.rs`;
    /// default 8,192). Larger saves page writes under scattered writes,
    /// makes the commit that folds a bucket longer, and costs reads of the
    /// index more rows to check.
    pub change_log_rows: u64,
    /// Make grouped commits (`Store::commit_group_exposed`, what a node's
    /// storage thread uses) durable through a write-ahead log next to the
    /// file (`<path>-wal`) instead of flushing redb's pages each time (see
    /// `wal.rs`; default `false`). Only for stores opened from a path.
    pub write_ahead_log: bool,
    /// With `write_ahead_log`: how often a grouped commit flushes redb's
    /// pages and starts the log afresh (default 10 s). Longer writes
    /// fewer pages under scattered writes, makes that commit take longer
    /// and the replay at open after a crash longer.
    pub checkpoint_interval: std::time::Duration,
}

/// Default of [`StoreOptions::checkpoint_interval`]. A checkpoint holds up
/// the writes queued behind it while it flushes every page dirtied since
/// the last (tens of ms under a saturating load on the 2-core test
/// machine): every 10 s that touches few writes, where every 1 s put it in
/// the p99 (`cargo bench --bench cluster`: W=2 C=64 p99 22 ms against
/// 40-53 ms, and fewer writes per second). The log is also checkpointed at
/// 64 MiB (`wal::MAX_LOG_BYTES`).
pub const DEFAULT_CHECKPOINT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            node_id: None,
            partitions: None,
            durability: Durability::default(),
            cache_bytes: None,
            clock: Arc::new(SystemClock),
            verify_on_open: true,
            change_log_rows: DEFAULT_CHANGE_LOG_ROWS,
            write_ahead_log: false,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("node_id", &self.node_id)
            .field("partitions", &self.partitions)
            .field("durability", &self.durability)
            .field("cache_bytes", &self.cache_bytes)
            .field("verify_on_open", &self.verify_on_open)
            .field("change_log_rows", &self.change_log_rows)
            .field("write_ahead_log", &self.write_ahead_log)
            .field("checkpoint_interval", &self.checkpoint_interval)
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    pub fn node_id(mut self, node: NodeId) -> Self {
        self.node_id = Some(node);
        self
    }

    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = Some(partitions);
        self
    }

    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    pub fn clock(mut self, clock: Arc<dyn WallClock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn verify_on_open(mut self, verify: bool) -> Self {
        self.verify_on_open = verify;
        self
    }

    /// See [`StoreOptions::change_log_rows`]; 0 folds at every commit.
    pub fn change_log_rows(mut self, rows: u64) -> Self {
        self.change_log_rows = rows;
        self
    }

    /// See [`StoreOptions::write_ahead_log`].
    pub fn write_ahead_log(mut self, on: bool) -> Self {
        self.write_ahead_log = on;
        self
    }

    /// See [`StoreOptions::checkpoint_interval`].
    pub fn checkpoint_interval(mut self, interval: std::time::Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }
}

/// What only the writer touches: the committed version vectors and clock.
struct WriterState {
    versions: Vec<VersionVector>,
    /// Per partition: see `tables::ISSUED_FLOOR` (of the current writer).
    issued_floor: Vec<u64>,
    hlc: HybridClock,
    /// The id local writes get dots of: `writer_id(node, epoch)`.
    writer: NodeId,
    epoch: u64,
    /// `META_EXPOSED` is durably set (entries may leave before commit).
    exposure_recorded: bool,
    /// A commit failed after its entries left: its dots may be held
    /// elsewhere, so the writer must change before the next local write.
    needs_new_writer: bool,
    /// See `index::LogState`.
    log: index::LogState,
    /// The write-ahead log, if the store was opened with one.
    wal: Option<wal::Wal>,
}

/// Where the write-ahead log of the store at `path` lives.
pub fn wal_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// The writer id of `node` at `epoch`: the node id itself at 0, else a
/// hash of both (64 bits, so it collides with no other writer in practice).
pub fn writer_id(node: NodeId, epoch: u64) -> NodeId {
    if epoch == 0 {
        return node;
    }
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(b"gossipkv writer ");
    bytes[16..24].copy_from_slice(&node.0.to_le_bytes());
    bytes[24..].copy_from_slice(&epoch.to_le_bytes());
    NodeId(xxhash_rust::xxh3::xxh3_64(&bytes))
}

/// Writes `epoch` as the writer epoch in `txn` and forgets the issued
/// floors, which belong to the previous writer (a new writer has issued
/// nothing, so its writes claim none of the old one's).
fn start_writer_epoch(txn: &redb::WriteTransaction, epoch: u64) -> Result<()> {
    txn.open_table(META)?
        .insert(META_WRITER_EPOCH, epoch.to_le_bytes().as_slice())?;
    let mut floors = txn.open_table(ISSUED_FLOOR)?;
    let partitions: Vec<u16> = floors
        .iter()?
        .map(|row| row.map(|(p, _)| p.value()))
        .collect::<std::result::Result<_, _>>()?;
    for p in partitions {
        floors.remove(p)?;
    }
    Ok(())
}

/// A node's local store. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    db: Database,
    node: NodeId,
    partitions: u16,
    durability: Durability,
    /// See [`StoreOptions::change_log_rows`].
    change_log_rows: u64,
    clock: Arc<dyn WallClock>,
    writer: Mutex<WriterState>,
    log_cache: Mutex<index::LogCache>,
    /// Per partition, whether local writes are accepted (see `writable`),
    /// kept beside the writer state so that asking never waits for a
    /// commit in progress.
    writable: Box<[AtomicBool]>,
    /// Told the keys of every committed write transaction (see
    /// [`Store::set_observer`]).
    observer: std::sync::OnceLock<KeyObserver>,
}

/// Called with the keys a committed transaction wrote or removed, after
/// the commit, on the thread that committed it: it must be quick.
pub type KeyObserver = Arc<dyn Fn(&[Vec<u8>]) + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("node", &self.node)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Sets the observer told the keys of every committed write (local
    /// writes, merges, anti-entropy and migration chunks, purges): what
    /// lets a node answer a watch without polling. Once per store; false
    /// if one was set already.
    pub fn set_observer(&self, observer: KeyObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// Opens the store at `path`, creating it if the file does not exist.
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let path = path.as_ref();
        check_options(&options)?;
        let mut builder = Database::builder();
        if let Some(bytes) = options.cache_bytes {
            builder.set_cache_size(bytes);
        }
        builder.set_check_integrity_on_open(options.verify_on_open);
        let shown = path.display().to_string();
        guard_damage(&shown, || {
            let opened = if path.exists() {
                builder.open(path).map_err(redb::Error::from)
            } else {
                create_whole(&builder, path)
            };
            let db = opened.map_err(|e| Error::Open {
                path: path.to_path_buf(),
                source: e,
            })?;
            let (wal, interval) = (options.write_ahead_log, options.checkpoint_interval);
            let store = Self::init(db, options, shown.clone())?;
            let log = wal_path(path);
            if wal {
                store.attach_wal(&log, interval)?;
            } else if log.exists() {
                // Opened without the log after a run with it (another
                // program, or the option turned off): its writes must not
                // be left behind.
                store.attach_wal(&log, interval)?;
                store.writer().wal = None;
                std::fs::remove_file(&log).map_err(|source| Error::WriteAheadLog {
                    path: log.display().to_string(),
                    source,
                })?;
            }
            Ok(store)
        })
    }

    /// Opens the store held by a redb storage backend, creating it if the
    /// backend is empty: for custom storage, and for tests that simulate
    /// crashes at the storage layer. Checks the same as [`Store::open`], and
    /// a damaged image is likewise an error, not a panic.
    pub fn open_with_backend(
        backend: impl redb::StorageBackend,
        options: StoreOptions,
    ) -> Result<Store> {
        check_options(&options)?;
        no_wal_without_path(&options)?;
        let mut builder = Database::builder();
        if let Some(bytes) = options.cache_bytes {
            builder.set_cache_size(bytes);
        }
        builder.set_check_integrity_on_open(options.verify_on_open);
        let shown = format!("{backend:?}");
        guard_damage(&shown, || {
            let db = builder
                .create_with_backend(backend)
                .map_err(|e| Error::Open {
                    path: PathBuf::from(&shown),
                    source: e.into(),
                })?;
            Self::init(db, options, shown.clone())
        })
    }

    /// Opens a store that lives in memory only (tests, simulation, caches).
    pub fn open_in_memory(options: StoreOptions) -> Result<Store> {
        check_options(&options)?;
        no_wal_without_path(&options)?;
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| Error::Open {
                path: PathBuf::from(":memory:"),
                source: e.into(),
            })?;
        Self::init(db, options, ":memory:".to_string())
    }

    /// Opens the write-ahead log, replays what it holds and checkpoints.
    fn attach_wal(&self, path: &Path, interval: std::time::Duration) -> Result<()> {
        let generation = {
            let txn = self.db.begin_read()?;
            let meta = txn.open_table(META)?;
            match meta.get(META_WAL_GENERATION)? {
                Some(v) => u64::from_le_bytes(fixed(
                    v.value(),
                    &path.display().to_string(),
                    META_WAL_GENERATION,
                )?),
                None => 0,
            }
        };
        let (wal, decoded) = wal::Wal::open(path, generation, interval)?;
        if decoded.torn_bytes > 0 {
            tracing::warn!(
                "{}: dropped {} bytes at its end, a record whose write never completed (none of its writes was acknowledged)",
                path.display(),
                decoded.torn_bytes
            );
        }
        let mut state = self.writer();
        state.wal = Some(wal);
        let shown = path.display().to_string();
        self.checkpoint_locked(
            &mut state,
            |w| {
                for logged in &decoded.entries {
                    let entry = self
                        .check_remote(logged.partition, &logged.key, &logged.entry)
                        .map_err(|e| Error::Corrupt {
                            what: format!("write-ahead log {shown}"),
                            reason: e.to_string(),
                        })?;
                    w.merge_logged(logged.partition, &logged.key, entry)?;
                }
                Ok(())
            },
            |_| (),
        )?;
        if !decoded.entries.is_empty() {
            tracing::info!(
                "{shown}: replayed {} entries written since the last checkpoint",
                decoded.entries.len()
            );
        }
        Ok(())
    }

    fn init(db: Database, options: StoreOptions, path: String) -> Result<Store> {
        let txn = db.begin_write()?;
        let (node, partitions, hlc) = {
            let existing_tables = txn.list_tables()?.count() + txn.list_multimap_tables()?.count();
            let mut meta = txn.open_table(META).map_err(|e| match e {
                redb::TableError::TableTypeMismatch { .. }
                | redb::TableError::TableIsMultimap(_) => Error::NotAStore {
                    path: path.clone(),
                    reason: format!("its meta table is not gossipkv's ({e})"),
                },
                e => e.into(),
            })?;
            let format = meta.get(META_FORMAT)?.map(|v| v.value().to_vec());
            match format {
                None if existing_tables > 0 => {
                    return Err(Error::NotAStore {
                        path,
                        reason: "the database has tables but no gossipkv metadata".into(),
                    })
                }
                None => {
                    let node = options.node_id.unwrap_or_else(NodeId::random);
                    let partitions = options.partitions.unwrap_or(DEFAULT_PARTITIONS);
                    meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
                    meta.insert(META_NODE_ID, node.0.to_le_bytes().as_slice())?;
                    meta.insert(META_PARTITIONS, partitions.to_le_bytes().as_slice())?;
                    meta.insert(META_HASH, HASH_SCHEME.as_bytes())?;
                    (node, partitions, HybridClock::default())
                }
                Some(format) => {
                    let found = u32::from_le_bytes(fixed(&format, &path, META_FORMAT)?);
                    if UPGRADABLE_FORMATS.contains(&found) {
                        meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
                    } else if found != FORMAT_VERSION {
                        return Err(Error::UnsupportedFormat {
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                    let read = |name: &str| -> Result<Vec<u8>> {
                        meta.get(name)?.map(|v| v.value().to_vec()).ok_or_else(|| {
                            Error::NotAStore {
                                path: path.clone(),
                                reason: format!("metadata field {name} is missing"),
                            }
                        })
                    };
                    let node = NodeId(u64::from_le_bytes(fixed(
                        &read(META_NODE_ID)?,
                        &path,
                        META_NODE_ID,
                    )?));
                    let partitions =
                        u16::from_le_bytes(fixed(&read(META_PARTITIONS)?, &path, META_PARTITIONS)?);
                    let hash = read(META_HASH)?;
                    if hash != HASH_SCHEME.as_bytes() || partitions == 0 {
                        return Err(Error::Corrupt {
                            what: "metadata".into(),
                            reason: format!(
                                "hash scheme {:?} with {partitions} partitions (this build uses {HASH_SCHEME})",
                                String::from_utf8_lossy(&hash)
                            ),
                        });
                    }
                    if let Some(requested) = options.node_id.filter(|&n| n != node) {
                        return Err(Error::NodeIdMismatch {
                            stored: node,
                            requested,
                        });
                    }
                    if let Some(requested) = options.partitions.filter(|&p| p != partitions) {
                        return Err(Error::PartitionCountMismatch {
                            stored: partitions,
                            requested,
                        });
                    }
                    let hlc = match meta.get(META_HLC)? {
                        Some(v) => {
                            HlcTimestamp(u64::from_le_bytes(fixed(v.value(), &path, META_HLC)?))
                        }
                        None => HlcTimestamp::default(),
                    };
                    (node, partitions, HybridClock::resume(hlc))
                }
            }
        };
        // Create the other tables so that read transactions find them.
        txn.open_table(ENTRIES)?;
        txn.open_table(CHANGES)?;
        txn.open_table(CHANGE_LOG)?;
        txn.open_table(TOMBSTONES)?;
        txn.open_table(PURGED)?;
        let has_feed_index = txn.open_table(META)?.get(META_FEED_INDEX)?.is_some();
        if !has_feed_index {
            let rows = feed::build_index(&txn)?;
            if rows > 0 {
                tracing::info!("{path}: built the change feed index ({rows} rows)");
            }
            txn.open_table(META)?
                .insert(META_FEED_INDEX, [1u8].as_slice())?;
        }
        let mut versions = vec![VersionVector::new(); usize::from(partitions)];
        {
            let table = txn.open_table(VERSIONS)?;
            for row in table.iter()? {
                let (p, bytes) = row?;
                let p = p.value();
                let slot = versions
                    .get_mut(usize::from(p))
                    .ok_or_else(|| Error::Corrupt {
                        what: "partition versions".into(),
                        reason: format!("partition {p} is out of range ({partitions} partitions)"),
                    })?;
                *slot = decode_version(bytes.value(), p)?;
            }
        }
        let (epoch, exposed) = {
            let meta = txn.open_table(META)?;
            let epoch = match meta.get(META_WRITER_EPOCH)? {
                Some(v) => u64::from_le_bytes(fixed(v.value(), &path, META_WRITER_EPOCH)?),
                None => 0,
            };
            let exposed = meta.get(META_EXPOSED)?.is_some();
            (epoch, exposed)
        };
        let epoch = if exposed {
            // Entries may have left before a commit this crash lost: their
            // dots must never be issued again, so write as a new writer.
            let next = epoch.checked_add(1).ok_or_else(|| Error::Corrupt {
                what: "metadata".into(),
                reason: "the writer epoch is exhausted".into(),
            })?;
            start_writer_epoch(&txn, next)?;
            txn.open_table(META)?.remove(META_EXPOSED)?;
            tracing::info!(
                "{path}: not closed cleanly while it replicated writes ahead of their commit; local writes now go under writer epoch {next} ({})",
                writer_id(node, next)
            );
            next
        } else {
            epoch
        };
        let writer = writer_id(node, epoch);
        let mut issued_floor = vec![0u64; usize::from(partitions)];
        for row in txn.open_table(ISSUED_FLOOR)?.iter()? {
            let (p, seq) = row?;
            if let Some(slot) = issued_floor.get_mut(usize::from(p.value())) {
                *slot = seq.value();
            }
        }
        let log = index::LogState::read(&txn, partitions)?;
        txn.commit()?;
        Ok(Store {
            db,
            node,
            partitions,
            durability: options.durability,
            change_log_rows: options.change_log_rows,
            clock: options.clock,
            observer: std::sync::OnceLock::new(),
            log_cache: Mutex::new(index::LogCache::default()),
            writable: versions
                .iter()
                .zip(&issued_floor)
                .map(|(vv, &floor)| AtomicBool::new(holds_own_writes(writer, vv, floor)))
                .collect(),
            writer: Mutex::new(WriterState {
                versions,
                issued_floor,
                hlc,
                writer,
                epoch,
                exposure_recorded: false,
                log,
                needs_new_writer: false,
                wal: None,
            }),
        })
    }

    /// The node this store belongs to (its identity in the cluster).
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// The id local writes are made under: the node id, or after an
    /// unclean close that may have lost writes other replicas hold, a new
    /// writer derived from it (see [`Store::commit_group_exposed`]).
    pub fn writer_id(&self) -> NodeId {
        self.writer().writer
    }

    /// Records a clean close: everything committed is durable and no
    /// commit that exposed its entries failed, so the next open may keep
    /// the writer. Call it once nothing writes any more (a later exposed
    /// commit records the exposure again).
    pub fn close(&self) -> Result<()> {
        let mut state = self.writer();
        if state.wal.as_ref().is_some_and(|w| !w.is_empty()) {
            self.checkpoint_locked(&mut state, |_| Ok(()), |_| ())?;
        }
        if !state.exposure_recorded || state.needs_new_writer {
            return Ok(());
        }
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        txn.open_table(META)?.remove(META_EXPOSED)?;
        txn.commit()?;
        state.exposure_recorded = false;
        Ok(())
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// The partition `key` belongs to in this store.
    pub fn partition_of(&self, key: &[u8]) -> u16 {
        partition_of(key, self.partitions)
    }

    /// Reads a key. `None` if it was never written, or deleted.
    pub fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        Ok(self.load(key)?.and_then(Entry::into_record))
    }

    /// The key's causal context, also for a deleted key whose tombstone has
    /// not been purged yet. `None` if the store holds nothing for the key.
    pub fn causal_context(&self, key: &[u8]) -> Result<Option<CausalContext>> {
        Ok(self.load(key)?.map(|e| e.context))
    }

    /// The key's encoded entry, as `changes_since` would send it: what a
    /// coordinator replicates to the other replicas after a write.
    pub fn entry_bytes(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.make_durable()?;
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let bytes = table.get(key)?;
        Ok(bytes.map(|b| b.value().to_vec()))
    }

    /// A counter's value; 0 if the key does not exist.
    pub fn counter(&self, key: &[u8]) -> Result<i64> {
        let entry = self.load_as(key, ValueKind::Counter)?;
        Ok(entry.map(|e| e.counter_value()).unwrap_or(0))
    }

    /// A set's members, sorted; empty if the key does not exist.
    pub fn set_members(&self, key: &[u8]) -> Result<Vec<Vec<u8>>> {
        let entry = self.load_as(key, ValueKind::Set)?;
        Ok(entry.map(|e| e.members()).unwrap_or_default())
    }

    /// Live keys starting with `prefix`, in key order, with their records.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<PrefixIter> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let range = table.range::<&[u8]>(prefix..)?;
        Ok(PrefixIter {
            range,
            prefix: prefix.to_vec(),
            done: false,
        })
    }

    /// Up to `limit` live keys of the partitions `wanted` says (indexed by
    /// partition) that start with `prefix` and sort after `start_after`,
    /// in key order, with their kinds: one page of a listing.
    pub fn list_keys(
        &self,
        wanted: &[bool],
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, ValueKind)>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let from = match start_after {
            Some(after) if after >= prefix => std::ops::Bound::Excluded(after),
            _ => std::ops::Bound::Included(prefix),
        };
        let mut keys = Vec::new();
        for row in table.range::<&[u8]>((from, std::ops::Bound::Unbounded))? {
            if keys.len() >= limit {
                break;
            }
            let (key, bytes) = row?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            if !wanted
                .get(usize::from(self.partition_of(key)))
                .copied()
                .unwrap_or(false)
            {
                continue;
            }
            if let Some(record) = decode_entry(key, bytes.value())?.into_record() {
                keys.push((key.to_vec(), record.value.kind()));
            }
        }
        Ok(keys)
    }

    /// Whether local writes to `partition` are accepted: this store holds
    /// every write it ever issued there. False after the partition was
    /// dropped, until a sync from a replica brings those writes back (see
    /// [`Error::OwnWritesMissing`](crate::Error::OwnWritesMissing)).
    pub fn writable(&self, partition: u16) -> bool {
        self.writable
            .get(usize::from(partition))
            .is_some_and(|w| w.load(Ordering::Acquire))
    }

    /// Updates `writable` for `partition` from the writer state just
    /// committed.
    fn refresh_writable(&self, state: &WriterState, partition: u16) {
        let p = usize::from(partition);
        if let (Some(flag), Some(vv), Some(&floor)) = (
            self.writable.get(p),
            state.versions.get(p),
            state.issued_floor.get(p),
        ) {
            flag.store(holds_own_writes(state.writer, vv, floor), Ordering::Release);
        }
    }

    /// The partition's version vector: the writes this store has incorporated.
    pub fn partition_version(&self, partition: u16) -> Result<VersionVector> {
        self.check_partition(partition)?;
        let txn = self.db.begin_read()?;
        read_version(&txn.open_table(VERSIONS)?, partition)
    }

    /// With [`Durability::Buffered`], flushes every commit so far to disk.
    /// Called before entries leave the store: a buffered commit a crash
    /// loses must never have reached another replica, or the reopened store
    /// would issue its dots again for other writes, and sync, seeing those
    /// dots covered on both sides, would never reconcile the two.
    fn make_durable(&self) -> Result<()> {
        if self.durability == Durability::Buffered {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.commit()?;
        }
        Ok(())
    }

    fn load(&self, key: &[u8]) -> Result<Option<Entry>> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ENTRIES)?;
        let bytes = table.get(key)?;
        bytes.map(|b| decode_entry(key, b.value())).transpose()
    }

    fn load_as(&self, key: &[u8], kind: ValueKind) -> Result<Option<Entry>> {
        let entry = self.load(key)?;
        if let Some(entry) = &entry {
            if let Err(found) = entry.check_writable(kind) {
                return Err(Error::WrongType {
                    key: show_key(key),
                    expected: kind,
                    found,
                });
            }
        }
        Ok(entry)
    }

    fn check_partition(&self, partition: u16) -> Result<()> {
        if partition >= self.partitions {
            return Err(Error::PartitionOutOfRange {
                partition,
                count: self.partitions,
            });
        }
        Ok(())
    }

    /// The writer lock. A panic while it was held cannot leave it
    /// inconsistent: the vectors are only replaced after a commit.
    fn log_cache(&self) -> MutexGuard<'_, index::LogCache> {
        self.log_cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, WriterState> {
        self.writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Iterator over live keys with a prefix: see [`Store::scan_prefix`].
pub struct PrefixIter {
    range: redb::Range<'static, &'static [u8], &'static [u8]>,
    prefix: Vec<u8>,
    done: bool,
}

impl Iterator for PrefixIter {
    type Item = Result<(Vec<u8>, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let (key, bytes) = match self.range.next()? {
                Ok(row) => row,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
            };
            let key = key.value();
            if !key.starts_with(&self.prefix) {
                self.done = true;
                break;
            }
            match decode_entry(key, bytes.value()) {
                Ok(entry) => {
                    if let Some(record) = entry.into_record() {
                        return Some(Ok((key.to_vec(), record)));
                    }
                }
                Err(e) => return Some(Err(e)),
            }
        }
        None
    }
}

/// Creates a redb file at `path` so that a crash never leaves a partial one
/// there: redb writes a new file's header in several synced steps, and a file
/// cut short between them is "not a redb database" forever after. The file
/// is made under a temporary name and linked into place once complete (a
/// link, unlike a rename, keeps a store another process created meanwhile;
/// then that one is opened). A crash while creating can leave the temporary
/// file behind, never a damaged store.
fn create_whole(
    builder: &redb::Builder,
    path: &Path,
) -> std::result::Result<Database, redb::Error> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(
        ".creating-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let temporary = path.with_file_name(name);
    let created = (|| {
        let db = builder.create(&temporary)?;
        match std::fs::hard_link(&temporary, path) {
            Ok(()) => {
                let dir = match path.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() => dir,
                    _ => Path::new("."),
                };
                std::fs::File::open(dir)?.sync_all()?;
                Ok(db)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                drop(db);
                Ok(builder.open(path)?)
            }
            Err(e) => Err(e.into()),
        }
    })();
    // The database keeps its handle on the file, now also at `path`.
    let _ = std::fs::remove_file(&temporary);
    created
}

/// Runs an open. redb trusts page contents once its header checks out, and
/// panics on some damaged files; a damaged file must be an error, not a crash.
fn guard_damage(shown: &str, open: impl FnOnce() -> Result<Store>) -> Result<Store> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the database engine panicked");
        Err(Error::Corrupt {
            what: format!("database file {shown}"),
            reason: format!("damaged pages ({reason})"),
        })
    })
}

fn check_options(options: &StoreOptions) -> Result<()> {
    if options.partitions == Some(0) {
        return Err(Error::InvalidOption {
            name: "partitions",
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}

fn no_wal_without_path(options: &StoreOptions) -> Result<()> {
    if options.write_ahead_log {
        return Err(Error::InvalidOption {
            name: "write_ahead_log",
            reason: "needs a store opened from a path (Store::open)".into(),
        });
    }
    Ok(())
}

fn fixed<const N: usize>(bytes: &[u8], path: &str, field: &str) -> Result<[u8; N]> {
    bytes.try_into().map_err(|_| Error::NotAStore {
        path: path.to_string(),
        reason: format!(
            "metadata field {field} has {} bytes, expected {N}",
            bytes.len()
        ),
    })
}

/// Whether a partition's vector covers every sequence `node` ever issued
/// there (`floor`: the issued floor kept when it was dropped).
fn holds_own_writes(node: NodeId, vv: &VersionVector, floor: u64) -> bool {
    vv.base(node) >= vv.max_seq(node).max(floor)
}

/// The read view of an encoded entry (as `entry_bytes` returns it), for
/// showing another replica's state of a key.
pub fn decode_record(key: &[u8], bytes: &[u8]) -> Result<Option<Record>> {
    Ok(decode_entry(key, bytes)?.into_record())
}

/// A change feed entry as readers see it: its record (`None`: the key is
/// deleted) and its causal context, which a write or a delete of the key
/// hands back to supersede this state.
pub fn decode_change(key: &[u8], bytes: &[u8]) -> Result<(Option<Record>, CausalContext)> {
    let entry = decode_entry(key, bytes)?;
    let context = entry.context.clone();
    Ok((entry.into_record(), context))
}

pub(crate) fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<Entry> {
    Entry::decode(bytes).map_err(|e| Error::Corrupt {
        what: format!("entry {}", show_key(key)),
        reason: e.to_string(),
    })
}

fn decode_version(bytes: &[u8], partition: u16) -> Result<VersionVector> {
    let corrupt = |reason: String| Error::Corrupt {
        what: format!("version vector of partition {partition}"),
        reason,
    };
    let (mut vv, rest): (VersionVector, _) =
        postcard::take_from_bytes(bytes).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    if vv.normalize() {
        return Err(corrupt("not in normal form".into()));
    }
    Ok(vv)
}

fn read_version(
    table: &impl ReadableTable<u16, &'static [u8]>,
    partition: u16,
) -> Result<VersionVector> {
    match table.get(partition)? {
        Some(bytes) => decode_version(bytes.value(), partition),
        None => Ok(VersionVector::new()),
    }
}

fn encode_version(vv: &VersionVector) -> Vec<u8> {
    // Serializing plain data into a Vec does not fail.
    postcard::to_allocvec(vv).unwrap_or_default()
}
