//! Writes: local operations (alone or batched) and merges of remote entries,
//! each batch in one redb transaction.
//!
//! Every local operation gets a fresh dot `(this node, seq)` where `seq` is
//! one above the highest sequence of this node in the key's partition. The
//! entry, its change-index rows, its tombstone row and the partition's
//! version vector are written in the same transaction, so after a crash a
//! store never holds an entry its version vector does not account for, nor
//! the reverse.

use super::feed::{feed_prefixes, prefix_hash};
use super::index;
use super::tables::*;
use super::{
    decode_entry, encode_version, Durability, Store, WriterState, MAX_KEY_BYTES, MAX_VALUE_BYTES,
};
use crate::crdt::entry::{CounterOverflow, Entry};
use crate::crdt::{CausalContext, Dot, HybridClock, NodeId, ValueKind, VersionVector};
use crate::error::{show_key, Error, Result};
use redb::{ReadableTable, Table, WriteTransaction};
use std::collections::BTreeMap;

/// One local operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write a register value. With a context, supersede exactly what it
    /// covers; without, supersede everything this store has seen of the key.
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        context: Option<CausalContext>,
    },
    /// Write a last-writer-wins value.
    PutLww { key: Vec<u8>, value: Vec<u8> },
    /// Delete a register or LWW key, leaving a causal tombstone.
    Delete {
        key: Vec<u8>,
        context: Option<CausalContext>,
    },
    /// Add a signed amount to a counter.
    CounterAdd { key: Vec<u8>, amount: i64 },
    /// Add a member to a set.
    SetAdd { key: Vec<u8>, member: Vec<u8> },
    /// Remove the additions of a member this store has observed.
    SetRemove { key: Vec<u8>, member: Vec<u8> },
}

impl Op {
    /// The key and value bytes the operation carries.
    pub fn payload_bytes(&self) -> usize {
        let data = match self {
            Op::Put { value, .. } | Op::PutLww { value, .. } => value.len(),
            Op::SetAdd { member, .. } | Op::SetRemove { member, .. } => member.len(),
            Op::Delete { .. } | Op::CounterAdd { .. } => 8,
        };
        self.key().len() + data
    }

    /// The key the operation writes.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. }
            | Op::PutLww { key, .. }
            | Op::Delete { key, .. }
            | Op::CounterAdd { key, .. }
            | Op::SetAdd { key, .. }
            | Op::SetRemove { key, .. } => key,
        }
    }
}

/// Operations committed together: all of them or none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, op: Op) -> &mut Self {
        self.ops.push(op);
        self
    }

    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.push(Op::Put {
            key: key.into(),
            value: value.into(),
            context: None,
        })
    }

    pub fn put_with_context(
        &mut self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        context: CausalContext,
    ) -> &mut Self {
        self.push(Op::Put {
            key: key.into(),
            value: value.into(),
            context: Some(context),
        })
    }

    pub fn put_lww(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> &mut Self {
        self.push(Op::PutLww {
            key: key.into(),
            value: value.into(),
        })
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>, context: Option<CausalContext>) -> &mut Self {
        self.push(Op::Delete {
            key: key.into(),
            context,
        })
    }

    pub fn counter_add(&mut self, key: impl Into<Vec<u8>>, amount: i64) -> &mut Self {
        self.push(Op::CounterAdd {
            key: key.into(),
            amount,
        })
    }

    pub fn set_add(&mut self, key: impl Into<Vec<u8>>, member: impl Into<Vec<u8>>) -> &mut Self {
        self.push(Op::SetAdd {
            key: key.into(),
            member: member.into(),
        })
    }

    pub fn set_remove(&mut self, key: impl Into<Vec<u8>>, member: impl Into<Vec<u8>>) -> &mut Self {
        self.push(Op::SetRemove {
            key: key.into(),
            member: member.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// What a local operation left behind.
pub(super) struct Applied {
    pub(super) context: CausalContext,
    pub(super) counter: Option<i64>,
    /// The key's encoded entry after the operation (`None` for a delete
    /// that found nothing to delete and wrote nothing).
    pub(super) entry: Option<Vec<u8>>,
}

impl Store {
    /// Writes a register value; returns the key's new causal context.
    pub fn put(
        &self,
        key: &[u8],
        value: &[u8],
        context: Option<&CausalContext>,
    ) -> Result<CausalContext> {
        let op = Op::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context: context.cloned(),
        };
        Ok(self.write_one(op)?.context)
    }

    /// Writes a last-writer-wins value; returns the key's new causal context.
    pub fn put_lww(&self, key: &[u8], value: &[u8]) -> Result<CausalContext> {
        Ok(self
            .write_one(Op::PutLww {
                key: key.to_vec(),
                value: value.to_vec(),
            })?
            .context)
    }

    /// Deletes a register or LWW key. Without a context, deletes what this
    /// store has seen; a value written concurrently elsewhere survives.
    pub fn delete(&self, key: &[u8], context: Option<&CausalContext>) -> Result<CausalContext> {
        Ok(self
            .write_one(Op::Delete {
                key: key.to_vec(),
                context: context.cloned(),
            })?
            .context)
    }

    /// Adds `amount` (which may be negative) to a counter; returns its new value here.
    pub fn counter_add(&self, key: &[u8], amount: i64) -> Result<i64> {
        let applied = self.write_one(Op::CounterAdd {
            key: key.to_vec(),
            amount,
        })?;
        Ok(applied.counter.unwrap_or_default())
    }

    pub fn set_add(&self, key: &[u8], member: &[u8]) -> Result<CausalContext> {
        Ok(self
            .write_one(Op::SetAdd {
                key: key.to_vec(),
                member: member.to_vec(),
            })?
            .context)
    }

    pub fn set_remove(&self, key: &[u8], member: &[u8]) -> Result<CausalContext> {
        Ok(self
            .write_one(Op::SetRemove {
                key: key.to_vec(),
                member: member.to_vec(),
            })?
            .context)
    }

    /// Commits every operation of the batch in one transaction, or none of
    /// them if one fails. Returns each key's causal context after its op.
    pub fn write(&self, batch: &Batch) -> Result<Vec<CausalContext>> {
        self.with_write(|w| {
            batch
                .ops
                .iter()
                .map(|op| w.local(op).map(|a| a.context))
                .collect()
        })
    }

    fn write_one(&self, op: Op) -> Result<Applied> {
        self.with_write(|w| w.local(&op))
    }

    /// Runs `f` in a write transaction and commits. The writer state is
    /// updated only after the commit succeeded.
    pub(super) fn with_write<R>(&self, f: impl FnOnce(&mut Writer<'_>) -> Result<R>) -> Result<R> {
        let mut state = self.writer();
        if state.needs_new_writer {
            self.new_writer(&mut state)?;
        }
        self.write_locked(&mut state, f, None, |_| ())
    }

    /// Moves local writes to the next writer epoch, durably, before any
    /// write uses it (see [`Store::commit_group_exposed`]).
    pub(super) fn new_writer(&self, state: &mut WriterState) -> Result<()> {
        let epoch = state.epoch.checked_add(1).ok_or_else(|| Error::Corrupt {
            what: "metadata".into(),
            reason: "the writer epoch is exhausted".into(),
        })?;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        super::start_writer_epoch(&txn, epoch)?;
        txn.commit()?;
        state.epoch = epoch;
        state.writer = super::writer_id(self.node, epoch);
        state.needs_new_writer = false;
        state.issued_floor.iter_mut().for_each(|f| *f = 0);
        tracing::warn!(
            "a commit failed after its writes were sent to other replicas: local writes now go under writer epoch {epoch} ({})",
            state.writer
        );
        for p in 0..self.partitions {
            self.refresh_writable(state, p);
        }
        Ok(())
    }

    /// The body of `with_write`: `before_commit` sees the result once `f`
    /// applied everything, before the commit.
    pub(super) fn write_locked<R>(
        &self,
        state: &mut WriterState,
        f: impl FnOnce(&mut Writer<'_>) -> Result<R>,
        durability: Option<redb::Durability>,
        before_commit: impl FnOnce(&R),
    ) -> Result<R> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(durability.unwrap_or(match self.durability {
            Durability::Immediate => redb::Durability::Immediate,
            Durability::Buffered => redb::Durability::None,
        }))?;
        let (result, touched, dropped, hlc, written, log) = {
            let mut writer = Writer::new(self, &txn, state)?;
            let result = f(&mut writer)?;
            writer.flush()?;
            (
                result,
                writer.touched,
                writer.dropped,
                writer.hlc,
                writer.written,
                writer.log,
            )
        };
        before_commit(&result);
        txn.commit()?;
        for (p, issued) in dropped {
            state.versions[usize::from(p)] = VersionVector::new();
            state.issued_floor[usize::from(p)] = issued;
            self.refresh_writable(state, p);
        }
        for (p, vv) in touched {
            state.versions[usize::from(p)] = vv;
            self.refresh_writable(state, p);
        }
        state.hlc = hlc;
        state.log = log;
        if let (Some(observer), Some(keys)) = (self.observer.get(), written) {
            if !keys.is_empty() {
                observer(&keys);
            }
        }
        Ok(result)
    }
}

/// The tables and uncommitted state of one write transaction.
pub(super) struct Writer<'t> {
    store: &'t Store,
    entries: Table<'t, &'static [u8], &'static [u8]>,
    changes: Table<'t, (u16, u64, u64), &'static [u8]>,
    change_log: Table<'t, LogAt, LogRow>,
    /// The change log as this transaction leaves it.
    pub(super) log: index::LogState,
    log_appended: bool,
    prefix_changes: Table<'t, (u64, u16, u64, u64), &'static [u8]>,
    tombstones: Table<'t, (u16, &'static [u8]), ()>,
    versions_table: Table<'t, u16, &'static [u8]>,
    purged_table: Table<'t, u16, &'static [u8]>,
    meta: Table<'t, &'static str, &'static [u8]>,
    committed: &'t [VersionVector],
    /// Version vectors this transaction changed.
    pub(super) touched: BTreeMap<u16, VersionVector>,
    /// Partitions this transaction dropped whole, with their issued floor.
    dropped: Vec<(u16, u64)>,
    issued_table: Table<'t, u16, u64>,
    issued_floor: &'t [u64],
    /// The id this transaction's local writes get dots of.
    writer: NodeId,
    hlc: HybridClock,
    hlc_start: HybridClock,
    /// Keys written or removed, when the store has an observer.
    written: Option<Vec<Vec<u8>>>,
}

impl<'t> Writer<'t> {
    fn new(store: &'t Store, txn: &'t WriteTransaction, state: &'t WriterState) -> Result<Self> {
        Ok(Writer {
            change_log: txn.open_table(CHANGE_LOG)?,
            log: state.log,
            log_appended: false,
            store,
            entries: txn.open_table(ENTRIES)?,
            changes: txn.open_table(CHANGES)?,
            prefix_changes: txn.open_table(PREFIX_CHANGES)?,
            tombstones: txn.open_table(TOMBSTONES)?,
            versions_table: txn.open_table(VERSIONS)?,
            purged_table: txn.open_table(PURGED)?,
            meta: txn.open_table(META)?,
            committed: &state.versions,
            touched: BTreeMap::new(),
            dropped: Vec::new(),
            written: store.observer.get().map(|_| Vec::new()),
            issued_table: txn.open_table(ISSUED_FLOOR)?,
            issued_floor: &state.issued_floor,
            writer: state.writer,
            hlc: state.hlc,
            hlc_start: state.hlc,
        })
    }

    /// The writer id of this store's local writes (see `writer_id`).
    pub(super) fn node(&self) -> NodeId {
        self.writer
    }

    pub(super) fn version_mut(&mut self, partition: u16) -> &mut VersionVector {
        let committed = self.committed;
        self.touched
            .entry(partition)
            .or_insert_with(|| committed[usize::from(partition)].clone())
    }

    pub(super) fn version(&self, partition: u16) -> &VersionVector {
        self.touched
            .get(&partition)
            .unwrap_or(&self.committed[usize::from(partition)])
    }

    /// The highest sequence this node has issued in the partition.
    fn issued(&self, partition: u16) -> u64 {
        let floor = self.issued_floor[usize::from(partition)];
        self.version(partition).max_seq(self.node()).max(floor)
    }

    pub(super) fn load(&self, key: &[u8]) -> Result<Option<Entry>> {
        let bytes = self.entries.get(key)?;
        bytes.map(|b| decode_entry(key, b.value())).transpose()
    }

    pub(super) fn local(&mut self, op: &Op) -> Result<Applied> {
        self.local_pushed(op, None)
    }

    /// `op`, or with `pushed` (device, sequence) a device's operation: done
    /// unless the key records that operation as applied already, and then
    /// recorded with the write (see `Entry::device_seq`). An operation
    /// applied already answers with the key's state and writes nothing.
    pub(super) fn local_pushed(&mut self, op: &Op, pushed: Option<(u64, u64)>) -> Result<Applied> {
        let key = op.key();
        check_key(key)?;
        let partition = self.store.partition_of(key);
        let existing = self.load(key)?;
        if let (Some((device, seq)), Some(entry)) = (pushed, &existing) {
            if entry.device_seq(device) >= seq {
                return Ok(Applied {
                    context: entry.context.clone(),
                    counter: matches!(op, Op::CounterAdd { .. }).then(|| entry.counter_value()),
                    entry: Some(entry.encode()),
                });
            }
        }
        let was_tombstone = existing.as_ref().map(Entry::is_tombstone);
        let mut entry = existing.unwrap_or_default();
        let before = entry.index_dots();
        let kind = match op {
            Op::Put { .. } => ValueKind::Register,
            Op::PutLww { .. } => ValueKind::Lww,
            Op::CounterAdd { .. } => ValueKind::Counter,
            Op::SetAdd { .. } | Op::SetRemove { .. } => ValueKind::Set,
            Op::Delete { context, .. } => {
                match entry.live_kinds().next() {
                    Some(k @ (ValueKind::Counter | ValueKind::Set)) => {
                        return Err(Error::DeleteUnsupported {
                            key: show_key(key),
                            kind: k,
                        })
                    }
                    None if was_tombstone.is_none() && context.is_none() => {
                        // Nothing here and nothing seen elsewhere: no-op.
                        return Ok(Applied {
                            context: CausalContext::new(),
                            counter: None,
                            entry: None,
                        });
                    }
                    Some(k) => k,
                    None => ValueKind::Register,
                }
            }
        };
        if let Err(found) = entry.check_writable(kind) {
            return Err(Error::WrongType {
                key: show_key(key),
                expected: kind,
                found,
            });
        }
        let node = self.node();
        let issued = self.issued(partition);
        // A dot `(node, seq)` in a key's context claims that the writer's
        // state included all of its own writes below `seq`. That holds only
        // while this store holds every write it issued in the partition.
        let held = self.version(partition).base(node);
        if held < issued {
            return Err(Error::OwnWritesMissing {
                partition,
                held,
                issued,
            });
        }
        let seq = issued
            .checked_add(1)
            .ok_or(Error::SequenceExhausted { partition })?;
        let dot = Dot::new(node, seq);
        let mut counter = None;
        match op {
            Op::Put { value, context, .. } => {
                check_value("value", value)?;
                let seen = self.check_context(key, partition, context.as_ref(), &entry)?;
                entry.write_register(Some(value.clone()), dot, &seen);
            }
            Op::PutLww { value, .. } => {
                check_value("value", value)?;
                let time = self.hlc.tick(self.store.clock.now_ms());
                entry.write_lww(Some(value.clone()), dot, time);
            }
            Op::Delete { context, .. } => {
                let seen = self.check_context(key, partition, context.as_ref(), &entry)?;
                if kind == ValueKind::Lww {
                    let time = self.hlc.tick(self.store.clock.now_ms());
                    entry.write_lww(None, dot, time);
                } else {
                    entry.write_register(None, dot, &seen);
                }
            }
            Op::CounterAdd { amount, .. } => {
                let value = entry
                    .counter_add(*amount, dot)
                    .map_err(|CounterOverflow| Error::CounterOverflow { key: show_key(key) })?;
                counter = Some(value);
            }
            Op::SetAdd { member, .. } => {
                check_value("set member", member)?;
                entry.set_add(member.clone(), dot);
            }
            Op::SetRemove { member, .. } => entry.set_remove(member.clone(), dot),
        }
        if let Some((device, seq)) = pushed {
            entry.note_device_seq(device, seq);
        }
        self.version_mut(partition).add(dot);
        let encoded = self.store_entry(partition, key, &before, was_tombstone, &entry)?;
        Ok(Applied {
            context: entry.context,
            counter,
            entry: Some(encoded),
        })
    }

    /// The context a register write supersedes: the client's, checked and
    /// cut down to what this store knows of the key, or everything this
    /// store has seen of the key.
    ///
    /// The write's entry keeps that context for good, so a dot in it that
    /// this store has not incorporated would mark a write it never saw as
    /// observed: when that write arrives, every replica drops it as
    /// superseded (invariant 2). A client context may name such dots
    /// honestly (it read a replica further ahead than this one) or not (a
    /// token of another key, a forged one). Either way this store only
    /// supersedes what it holds: per writer, up to its partition vector's
    /// contiguous base or the entry's own context, whichever is higher. A
    /// write it has not seen yet stays beside the new value as a sibling,
    /// which the next context-carrying write resolves.
    fn check_context(
        &self,
        key: &[u8],
        partition: u16,
        context: Option<&CausalContext>,
        entry: &Entry,
    ) -> Result<CausalContext> {
        let Some(context) = context else {
            return Ok(entry.context.clone());
        };
        let what = || format!("causal context for key {}", show_key(key));
        let node = self.node();
        self.check_issued(partition, what, &[Dot::new(node, context.get(node))])?;
        let version = self.version(partition);
        let mut known = CausalContext::new();
        for dot in context.dots() {
            let held = version.base(dot.node).max(entry.context.get(dot.node));
            let seq = dot.seq.min(held);
            if seq > 0 {
                known.apply(Dot::new(dot.node, seq));
            }
        }
        Ok(known)
    }

    /// Merges a remote entry. Returns false if it brought nothing new: every
    /// write it carries was already incorporated here. Skipping those is what
    /// keeps a purged tombstone from being resurrected by a stale copy.
    pub(super) fn merge_remote(
        &mut self,
        partition: u16,
        key: &[u8],
        incoming: Entry,
    ) -> Result<bool> {
        let what = || format!("remote entry for key {}", show_key(key));
        self.check_issued(partition, what, &incoming.index_dots())?;
        self.merge_logged(partition, key, incoming)
    }

    /// [`Writer::merge_remote`] without the check of this node's dots: for
    /// the store's own write-ahead log, whose local writes carry dots the
    /// last durable commit has not issued yet.
    pub(super) fn merge_logged(
        &mut self,
        partition: u16,
        key: &[u8],
        incoming: Entry,
    ) -> Result<bool> {
        let dots = incoming.index_dots();
        if dots.iter().all(|&d| self.version(partition).covers(d)) {
            return Ok(false);
        }
        if let Some(time) = incoming.lww_time() {
            self.hlc.observe(time, self.store.clock.now_ms());
        }
        let existing = self.load(key)?;
        let was_tombstone = existing.as_ref().map(Entry::is_tombstone);
        let mut entry = existing.unwrap_or_default();
        let before = entry.index_dots();
        entry.merge(incoming);
        let vv = self.version_mut(partition);
        for dot in dots {
            vv.add(dot);
        }
        self.store_entry(partition, key, &before, was_tombstone, &entry)?;
        Ok(true)
    }

    /// Refuses dots of this node above what it has issued: no peer can have
    /// seen a write of ours that we never made. They appear when a node's
    /// data was lost and its id reused, or when a peer lies; taking them
    /// would make this node reuse those sequence numbers for new writes.
    /// `what` names the claim, for the error only.
    pub(super) fn check_issued(
        &self,
        partition: u16,
        what: impl FnOnce() -> String,
        dots: &[Dot],
    ) -> Result<()> {
        let node = self.node();
        let issued = self.issued(partition);
        match dots.iter().find(|d| d.node == node && d.seq > issued) {
            Some(d) => Err(Error::UnissuedWrite {
                what: what(),
                node,
                claimed: d.seq,
                issued,
            }),
            None => Ok(()),
        }
    }

    /// Writes the entry with its index and tombstone rows; returns it
    /// encoded. `before` are the index dots of the entry as stored (empty if
    /// new).
    pub(super) fn store_entry(
        &mut self,
        partition: u16,
        key: &[u8],
        before: &[Dot],
        was_tombstone: Option<bool>,
        entry: &Entry,
    ) -> Result<Vec<u8>> {
        let after = entry.index_dots();
        for dot in before.iter().filter(|d| !after.contains(d)) {
            self.remove_row(partition, key, *dot)?;
        }
        for dot in after.iter().filter(|d| !before.contains(d)) {
            // Appended to the log, folded into `changes` later (`index.rs`).
            let bucket = index::bucket_of(partition);
            self.change_log.insert(
                (bucket, self.log.next),
                (partition, dot.node.0, dot.seq, key),
            )?;
            self.log.next += 1;
            self.log.rows[usize::from(bucket)] += 1;
            self.log_appended = true;
        }
        let encoded = entry.encode();
        self.entries.insert(key, encoded.as_slice())?;
        if let Some(written) = &mut self.written {
            written.push(key.to_vec());
        }
        let is_tombstone = entry.is_tombstone();
        if was_tombstone != Some(is_tombstone) {
            if is_tombstone {
                self.tombstones.insert((partition, key), ())?;
            } else if was_tombstone == Some(true) {
                self.tombstones.remove((partition, key))?;
            }
        }
        Ok(encoded)
    }

    /// Removes an entry and its rows (tombstone purge).
    pub(super) fn remove_entry(&mut self, partition: u16, key: &[u8], entry: &Entry) -> Result<()> {
        for dot in entry.index_dots() {
            self.remove_row(partition, key, dot)?;
        }
        self.entries.remove(key)?;
        self.tombstones.remove((partition, key))?;
        if let Some(written) = &mut self.written {
            written.push(key.to_vec());
        }
        Ok(())
    }

    pub(super) fn drop_partition(&mut self, partition: u16) -> Result<usize> {
        let mut rows = Vec::new();
        let range = (partition, 0u64, 0u64)..=(partition, u64::MAX, u64::MAX);
        for row in self.changes.range(range)? {
            let (position, key) = row?;
            rows.push((position.value(), key.value().to_vec()));
        }
        let mut removed = 0;
        for ((p, node, seq), key) in rows {
            self.remove_row(p, &key, Dot::new(NodeId(node), seq))?;
            if self.entries.remove(key.as_slice())?.is_some() {
                removed += 1;
            }
        }
        // Entries whose rows are still in the log; the rows go stale.
        let mut logged = Vec::new();
        let bucket = index::bucket_of(partition);
        for row in self.change_log.range((bucket, 0)..=(bucket, u64::MAX))? {
            let (_, row) = row?;
            let (p, _, _, key) = row.value();
            index::check_row(bucket, p, self.store.partitions)?;
            if p == partition {
                logged.push(key.to_vec());
            }
        }
        for key in logged {
            if self.entries.remove(key.as_slice())?.is_some() {
                removed += 1;
            }
        }
        for key in self.tombstone_keys(partition)? {
            self.tombstones.remove((partition, key.as_slice()))?;
        }
        let issued = self.issued(partition);
        self.issued_table.insert(partition, issued)?;
        self.versions_table.remove(partition)?;
        self.purged_table.remove(partition)?;
        self.touched.remove(&partition);
        self.dropped.push((partition, issued));
        Ok(removed)
    }

    /// Joins `vv` into the partition's purged vector (see `tables`).
    pub(super) fn join_purged(&mut self, partition: u16, vv: &VersionVector) -> Result<()> {
        let mut purged = match self.purged_table.get(partition)? {
            Some(bytes) => super::decode_version(bytes.value(), partition)?,
            None => VersionVector::new(),
        };
        let before = purged.clone();
        purged.join(vv);
        if purged != before {
            self.purged_table
                .insert(partition, encode_version(&purged).as_slice())?;
        }
        Ok(())
    }

    /// Removes a change index row of `key` and its prefix rows.
    fn remove_row(&mut self, partition: u16, key: &[u8], dot: Dot) -> Result<()> {
        self.changes.remove((partition, dot.node.0, dot.seq))?;
        for p in feed_prefixes(key) {
            self.prefix_changes
                .remove((prefix_hash(p), partition, dot.node.0, dot.seq))?;
        }
        Ok(())
    }

    /// Keys with tombstones in a partition, in key order.
    pub(super) fn tombstone_keys(&self, partition: u16) -> Result<Vec<Vec<u8>>> {
        let mut keys = Vec::new();
        let start: (u16, &[u8]) = (partition, &[]);
        for row in self.tombstones.range(start..)? {
            let (k, _) = row?;
            let (p, key) = k.value();
            if p != partition {
                break;
            }
            keys.push(key.to_vec());
        }
        Ok(keys)
    }

    /// Moves a bucket's live log rows into `changes` and `prefix_changes`
    /// (with the entries as this transaction left them) and empties it.
    fn fold_change_log(&mut self, bucket: u16) -> Result<()> {
        let mut rows = Vec::new();
        let range = (bucket, 0)..=(bucket, u64::MAX);
        for row in self.change_log.range(range.clone())? {
            let (_, row) = row?;
            let (p, origin, seq, key) = row.value();
            index::check_row(bucket, p, self.store.partitions)?;
            rows.push((p, origin, seq, key.to_vec()));
        }
        for (partition, origin, seq, key) in rows {
            if !index::is_live(&self.entries, &key, Dot::new(NodeId(origin), seq))? {
                continue;
            }
            self.changes
                .insert((partition, origin, seq), key.as_slice())?;
            for p in feed_prefixes(&key) {
                self.prefix_changes
                    .insert((prefix_hash(p), partition, origin, seq), key.as_slice())?;
            }
        }
        self.change_log.retain_in(range, |_, _| false)?;
        self.log.rows[usize::from(bucket)] = 0;
        self.log.folds += 1;
        self.meta.insert(
            META_CHANGE_LOG_FOLDS,
            self.log.folds.to_le_bytes().as_slice(),
        )?;
        Ok(())
    }

    /// Folds the fullest bucket of the change log once it holds its share
    /// of `change_log_rows` (every bucket with rows when that is 0).
    fn fold_full_bucket(&mut self) -> Result<()> {
        let share = self.store.change_log_rows / u64::from(index::LOG_BUCKETS);
        if share == 0 {
            for bucket in 0..index::LOG_BUCKETS {
                if self.log.rows[usize::from(bucket)] > 0 {
                    self.fold_change_log(bucket)?;
                }
            }
            return Ok(());
        }
        let (fullest, rows) = (0..index::LOG_BUCKETS)
            .map(|b| (b, self.log.rows[usize::from(b)]))
            .max_by_key(|&(_, rows)| rows)
            .unwrap_or_default();
        if rows >= share {
            self.fold_change_log(fullest)?;
        }
        Ok(())
    }

    /// Records the write-ahead log generation that continues this commit.
    pub(super) fn set_wal_generation(&mut self, generation: u64) -> Result<()> {
        self.meta.insert(
            super::tables::META_WAL_GENERATION,
            generation.to_le_bytes().as_slice(),
        )?;
        Ok(())
    }

    /// Persists the changed version vectors and the clock, and the change
    /// log's position; folds a bucket of the log that is full.
    fn flush(&mut self) -> Result<()> {
        if self.log_appended {
            self.meta
                .insert(META_CHANGE_LOG_NEXT, self.log.next.to_le_bytes().as_slice())?;
        }
        self.fold_full_bucket()?;
        for (&p, vv) in &self.touched {
            self.versions_table
                .insert(p, encode_version(vv).as_slice())?;
        }
        if self.hlc.last() != self.hlc_start.last() {
            self.meta
                .insert(META_HLC, self.hlc.last().0.to_le_bytes().as_slice())?;
        }
        Ok(())
    }
}

pub(crate) fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey("keys must not be empty".into()));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::TooLarge {
            what: "key",
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}

fn check_value(what: &'static str, value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::TooLarge {
            what,
            len: value.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}
