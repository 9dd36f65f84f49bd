//! Group commit: many independent writes in one transaction and one durable
//! commit, each with its own outcome; and reads merged from other replicas'
//! entries without writing.
//!
//! A write that fails its own checks (wrong type, bad context, a partition
//! this store cannot write) fails alone and leaves nothing behind: every such
//! check runs before the write touches a table. A storage error fails the
//! whole group and nothing of it is committed. Each local write still gets
//! its own dot; grouping changes nothing in the causal model.

use super::tables::{META, META_EXPOSED};
use super::wal::LoggedEntry;
use super::write::{Op, Writer};
use super::{ApplyReport, ChangeChunk};
use super::{Record, Store};
use crate::crdt::entry::Entry;
use crate::crdt::{CausalContext, ValueKind, VersionVector};
use crate::error::{show_key, Error, Result};

/// One write of a group (see [`Store::commit_group`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupWrite {
    /// A local operation: gets a fresh dot of this store.
    Local(Op),
    /// A device's operation `seq`, pushed: like `Local`, unless the key
    /// records it as applied already (then it writes nothing).
    Pushed { device: u64, seq: u64, op: Op },
    /// Merge another replica's entry of `key` (encoded as
    /// [`Store::entry_bytes`] gives it), which hashes to `partition`.
    Merge {
        partition: u16,
        key: Vec<u8>,
        entry: Vec<u8>,
    },
    /// Apply a chunk of another store's `changes_since` (anti-entropy,
    /// migration), as [`Store::apply`] does.
    Chunk(ChangeChunk),
    /// Purge the partition's causally stable tombstones ([`Store::purge`]).
    Purge {
        partition: u16,
        stable: VersionVector,
    },
    /// Drop the partition's data ([`Store::drop_partition`]) if
    /// `covered_by` (what a current replica is known to hold) still covers
    /// everything it holds when the write's turn comes: a write merged
    /// since the decision keeps the partition (for the next hand-off).
    Drop {
        partition: u16,
        covered_by: VersionVector,
    },
}

impl GroupWrite {
    /// Bytes this write carries (to bound a group's size).
    pub fn payload_bytes(&self) -> usize {
        match self {
            GroupWrite::Local(op) | GroupWrite::Pushed { op, .. } => op.payload_bytes(),
            GroupWrite::Merge { key, entry, .. } => key.len() + entry.len(),
            GroupWrite::Chunk(chunk) => chunk.payload_bytes(),
            GroupWrite::Purge { .. } | GroupWrite::Drop { .. } => 0,
        }
    }
}

/// What one write of a group did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupOutcome {
    Local {
        /// The key's causal context after the write.
        context: CausalContext,
        /// A counter's value here after an add.
        counter: Option<i64>,
        /// The key's encoded entry after the write, to replicate; `None` when
        /// the write changed nothing (a delete of a key never written).
        entry: Option<Vec<u8>>,
    },
    /// Whether the merge brought anything new.
    Merged { changed: bool },
    /// What applying a chunk did.
    Applied(ApplyReport),
    /// Tombstones purged.
    Purged(usize),
    /// Entries dropped with the partition; `None`: kept, it holds writes
    /// `covered_by` lacks.
    Dropped(Option<usize>),
}

impl Store {
    /// Commits `writes` in one transaction, in order (a later write to a
    /// key sees the earlier ones). The outer error is a storage failure:
    /// nothing was committed. Otherwise each write has its own result, and
    /// the ones that failed wrote nothing.
    pub fn commit_group(&self, writes: &[GroupWrite]) -> Result<Vec<Result<GroupOutcome>>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        self.with_write(|w| self.apply_group(w, writes))
    }

    /// Like [`Store::commit_group`], but calls `before_durable` with the
    /// outcomes once the writes are applied and before their commit is
    /// flushed: a node replicates the entries to other replicas while its
    /// own disk flushes. Always durable (whatever the store's durability).
    ///
    /// Entries that leave before their commit could be lost here by a crash
    /// while another replica holds them; their dots must never be issued
    /// again. So before the first such commit the store durably records
    /// that it exposes writes, and an open that finds the record (the
    /// process did not reach [`Store::close`]) writes from then on as a new
    /// writer ([`Store::writer_id`]); a commit that fails after its entries
    /// left does the same before the next local write. The old writer's
    /// writes that survive elsewhere come back like any other node's.
    pub fn commit_group_exposed(
        &self,
        writes: &[GroupWrite],
        before_durable: impl FnOnce(&[Result<GroupOutcome>]),
    ) -> Result<Vec<Result<GroupOutcome>>> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = self.writer();
        if state.needs_new_writer {
            self.new_writer(&mut state)?;
        }
        if !state.exposure_recorded {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(redb::Durability::Immediate)?;
            txn.open_table(META)?
                .insert(META_EXPOSED, [1u8].as_slice())?;
            txn.commit()?;
            state.exposure_recorded = true;
        }
        let hook = |outcomes: &Vec<Result<GroupOutcome>>| before_durable(outcomes);
        let logged = state.wal.as_ref().is_some_and(|wal| !wal.checkpoint_due())
            && writes.iter().all(|w| {
                matches!(
                    w,
                    GroupWrite::Local(_) | GroupWrite::Pushed { .. } | GroupWrite::Merge { .. }
                )
            });
        let result = if logged {
            self.write_locked(
                &mut state,
                |w| self.apply_group(w, writes),
                Some(redb::Durability::None),
                hook,
            )
            .and_then(|outcomes| {
                let entries = self.logged_entries(writes, &outcomes);
                match state.wal.as_mut() {
                    Some(wal) if !entries.is_empty() => match wal.append(&entries) {
                        Ok(()) => Ok(outcomes),
                        Err(source) => {
                            tracing::error!("{}: append failed: {source}; the next commit flushes the store instead", wal.path().display());
                            Err(Error::WriteAheadLog {
                                path: wal.path().display().to_string(),
                                source,
                            })
                        }
                    },
                    _ => Ok(outcomes),
                }
            })
        } else if state.wal.is_some() {
            // Chunks, purges and drops are not logged: their group flushes.
            self.checkpoint_locked(&mut state, |w| self.apply_group(w, writes), hook)
        } else {
            self.write_locked(
                &mut state,
                |w| self.apply_group(w, writes),
                Some(redb::Durability::Immediate),
                hook,
            )
        };
        if result.is_err() {
            // Nothing of the group committed, but if it failed after the
            // hook its entries left: never issue their dots again.
            state.needs_new_writer = true;
        }
        result
    }

    /// Checkpoints the write-ahead log if it holds anything: flushes the
    /// store's pages and starts the log afresh. A node's storage thread
    /// calls it when idle, so that readers stop consulting redb's buffer of
    /// unflushed pages and a crash has little to replay. False if there was
    /// nothing to do (no log, or an empty one).
    pub fn checkpoint(&self) -> Result<bool> {
        let mut state = self.writer();
        if state.wal.as_ref().is_none_or(|wal| wal.is_empty()) {
            return Ok(false);
        }
        self.checkpoint_locked(&mut state, |_| Ok(()), |_| ())?;
        Ok(true)
    }

    /// What the write-ahead log records of a group: every entry it changed,
    /// as it left it.
    fn logged_entries(
        &self,
        writes: &[GroupWrite],
        outcomes: &[Result<GroupOutcome>],
    ) -> Vec<LoggedEntry> {
        writes
            .iter()
            .zip(outcomes)
            .filter_map(|(write, outcome)| match (write, outcome) {
                (
                    GroupWrite::Local(op) | GroupWrite::Pushed { op, .. },
                    Ok(GroupOutcome::Local {
                        entry: Some(entry), ..
                    }),
                ) => Some(LoggedEntry {
                    partition: self.partition_of(op.key()),
                    key: op.key().to_vec(),
                    entry: entry.clone(),
                }),
                (
                    GroupWrite::Merge {
                        partition,
                        key,
                        entry,
                    },
                    Ok(GroupOutcome::Merged { changed: true }),
                ) => Some(LoggedEntry {
                    partition: *partition,
                    key: key.clone(),
                    entry: entry.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Runs `f` in a transaction that flushes, and with a write-ahead log
    /// starts the log's next generation: everything logged before is now
    /// durable in the file itself.
    pub(super) fn checkpoint_locked<R>(
        &self,
        state: &mut super::WriterState,
        f: impl FnOnce(&mut Writer<'_>) -> Result<R>,
        before_commit: impl FnOnce(&R),
    ) -> Result<R> {
        let next = state.wal.as_ref().map(|wal| wal.generation + 1);
        let result = self.write_locked(
            state,
            |w| {
                let r = f(w)?;
                if let Some(generation) = next {
                    w.set_wal_generation(generation)?;
                }
                Ok(r)
            },
            Some(redb::Durability::Immediate),
            before_commit,
        )?;
        if let (Some(wal), Some(generation)) = (state.wal.as_mut(), next) {
            if let Err(e) = wal.reset(generation) {
                // The file holds everything; the log is tried again at the
                // next commit, which flushes until then.
                tracing::error!("{}: could not start a new log: {e}", wal.path().display());
            }
        }
        Ok(result)
    }

    fn apply_group(
        &self,
        w: &mut Writer<'_>,
        writes: &[GroupWrite],
    ) -> Result<Vec<Result<GroupOutcome>>> {
        {
            let mut outcomes = Vec::with_capacity(writes.len());
            for write in writes {
                let outcome = match write {
                    GroupWrite::Local(op) => w.local(op).map(|a| GroupOutcome::Local {
                        context: a.context,
                        counter: a.counter,
                        entry: a.entry,
                    }),
                    GroupWrite::Pushed { device, seq, op } => w
                        .local_pushed(op, Some((*device, *seq)))
                        .map(|a| GroupOutcome::Local {
                            context: a.context,
                            counter: a.counter,
                            entry: a.entry,
                        }),
                    GroupWrite::Merge {
                        partition,
                        key,
                        entry,
                    } => self
                        .check_remote(*partition, key, entry)
                        .and_then(|entry| w.merge_remote(*partition, key, entry))
                        .map(|changed| GroupOutcome::Merged { changed }),
                    GroupWrite::Chunk(chunk) => self
                        .check_chunk(chunk)
                        .and_then(|checked| w.apply_chunk(checked))
                        .map(GroupOutcome::Applied),
                    GroupWrite::Purge { partition, stable } => self
                        .check_partition(*partition)
                        .and_then(|()| w.purge(*partition, stable))
                        .map(GroupOutcome::Purged),
                    GroupWrite::Drop {
                        partition,
                        covered_by,
                    } => self.check_partition(*partition).and_then(|()| {
                        if covered_by.dominates(w.version(*partition)) {
                            w.drop_partition(*partition).map(Some)
                        } else {
                            Ok(None)
                        }
                        .map(GroupOutcome::Dropped)
                    }),
                };
                // A storage error may leave the transaction half written:
                // give up on all of it (the caller reports it to every write).
                if let Err(e @ Error::Storage(_)) = outcome {
                    return Err(e);
                }
                outcomes.push(outcome);
            }
            Ok(outcomes)
        }
    }

    /// Decodes and checks a remote entry: its partition is in range, its
    /// key valid and hashing to that partition.
    pub(super) fn check_remote(&self, partition: u16, key: &[u8], entry: &[u8]) -> Result<Entry> {
        self.check_partition(partition)?;
        super::write::check_key(key)?;
        let actual = self.partition_of(key);
        if actual != partition {
            return Err(Error::MisroutedEntry {
                key: show_key(key),
                claimed: partition,
                actual,
            });
        }
        Entry::decode(entry).map_err(|e| Error::InvalidEntry {
            key: show_key(key),
            reason: e.to_string(),
        })
    }

    /// This store's entry of `key` merged, in memory, with other replicas'
    /// encoded entries of it: what a read at R > 1 answers from. Nothing is
    /// written; the caller merges the remote entries in durably (through
    /// `commit_group`) and repairs the replicas that were behind.
    pub fn merged_view(&self, key: &[u8], remote: &[Vec<u8>]) -> Result<MergedView> {
        let mut entry = self.load(key)?.unwrap_or_default();
        for bytes in remote {
            let incoming = Entry::decode(bytes).map_err(|e| Error::InvalidEntry {
                key: show_key(key),
                reason: e.to_string(),
            })?;
            entry.merge(incoming);
        }
        Ok(MergedView {
            key: key.to_vec(),
            encoded: entry.encode(),
            entry,
        })
    }
}

/// A key's state merged from several replicas (see [`Store::merged_view`]).
#[derive(Clone, Debug)]
pub struct MergedView {
    key: Vec<u8>,
    entry: Entry,
    encoded: Vec<u8>,
}

impl MergedView {
    /// The merged entry, encoded: what replicas that were behind get;
    /// `None` when no replica holds the key.
    pub fn encoded(&self) -> Option<&[u8]> {
        (self.entry != Entry::default()).then_some(self.encoded.as_slice())
    }

    /// The read view; `None` if the key is absent or deleted everywhere.
    pub fn record(&self) -> Option<Record> {
        self.entry.clone().into_record()
    }

    /// The counter's value; 0 if the key does not exist.
    pub fn counter(&self) -> Result<i64> {
        self.check(ValueKind::Counter)?;
        Ok(self.entry.counter_value())
    }

    /// The set's members, sorted.
    pub fn members(&self) -> Result<Vec<Vec<u8>>> {
        self.check(ValueKind::Set)?;
        Ok(self.entry.members())
    }

    fn check(&self, kind: ValueKind) -> Result<()> {
        self.entry
            .check_writable(kind)
            .map_err(|found| Error::WrongType {
                key: show_key(&self.key),
                expected: kind,
                found,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::NodeId;
    use crate::store::StoreOptions;

    fn store(node: u64) -> Store {
        Store::open_in_memory(StoreOptions::default().node_id(NodeId(node))).unwrap()
    }

    fn add(key: &str, amount: i64) -> GroupWrite {
        GroupWrite::Local(Op::CounterAdd {
            key: key.into(),
            amount,
        })
    }

    #[test]
    fn a_failed_write_fails_alone_and_the_rest_commit() {
        let s = store(1);
        s.put(b"reg", b"v", None).unwrap();
        let writes = vec![
            add("c", 2),
            add("reg", 1), // a register, not a counter
            add("c", 3),
            GroupWrite::Local(Op::Put {
                key: Vec::new(),
                value: b"x".to_vec(),
                context: None,
            }),
        ];
        let out = s.commit_group(&writes).unwrap();
        assert!(matches!(
            out[0],
            Ok(GroupOutcome::Local {
                counter: Some(2),
                ..
            })
        ));
        assert!(
            matches!(out[1], Err(Error::WrongType { .. })),
            "{:?}",
            out[1]
        );
        assert!(matches!(
            out[2],
            Ok(GroupOutcome::Local {
                counter: Some(5),
                ..
            })
        ));
        assert!(matches!(out[3], Err(Error::InvalidKey(_))));
        assert_eq!(s.counter(b"c").unwrap(), 5);
        assert_eq!(
            s.get(b"reg").unwrap().unwrap().value.kind(),
            ValueKind::Register
        );
        // Each write got its own dot: 1 (the put), 2 and 3.
        let p = s.partition_of(b"c");
        assert_eq!(s.partition_version(p).unwrap().max_seq(NodeId(1)), {
            if p == s.partition_of(b"reg") {
                3
            } else {
                2
            }
        });
    }

    #[test]
    fn merges_and_local_writes_share_a_group_and_replicate_what_they_wrote() {
        let a = store(1);
        let b = store(2);
        let out = a
            .commit_group(&[
                GroupWrite::Local(Op::SetAdd {
                    key: b"s".to_vec(),
                    member: b"x".to_vec(),
                }),
                add("c", 7),
            ])
            .unwrap();
        let entries: Vec<Vec<u8>> = out
            .into_iter()
            .map(|o| match o {
                Ok(GroupOutcome::Local { entry: Some(e), .. }) => e,
                other => panic!("{other:?}"),
            })
            .collect();
        let merges = vec![
            GroupWrite::Merge {
                partition: b.partition_of(b"s"),
                key: b"s".to_vec(),
                entry: entries[0].clone(),
            },
            GroupWrite::Merge {
                partition: b.partition_of(b"c"),
                key: b"c".to_vec(),
                entry: entries[1].clone(),
            },
            add("c", 1),
            // Misrouted: refused alone.
            GroupWrite::Merge {
                partition: b.partition_of(b"c").wrapping_add(1) % b.partitions(),
                key: b"c".to_vec(),
                entry: entries[1].clone(),
            },
        ];
        let out = b.commit_group(&merges).unwrap();
        assert!(matches!(out[0], Ok(GroupOutcome::Merged { changed: true })));
        assert!(matches!(
            out[2],
            Ok(GroupOutcome::Local {
                counter: Some(8),
                ..
            })
        ));
        assert!(matches!(out[3], Err(Error::MisroutedEntry { .. })));
        assert_eq!(b.set_members(b"s").unwrap(), vec![b"x".to_vec()]);
        assert_eq!(b.counter(b"c").unwrap(), 8);
        // The same merge again brings nothing.
        let again = b.commit_group(&merges[..1]).unwrap();
        assert!(matches!(
            again[0],
            Ok(GroupOutcome::Merged { changed: false })
        ));
    }

    #[test]
    fn a_merged_view_reads_what_either_side_holds_and_writes_nothing() {
        let a = store(1);
        let b = store(2);
        a.counter_add(b"c", 4).unwrap();
        b.counter_add(b"c", 5).unwrap();
        let remote = b.entry_bytes(b"c").unwrap().unwrap();
        let view = a.merged_view(b"c", &[remote]).unwrap();
        assert_eq!(view.counter().unwrap(), 9);
        assert!(matches!(view.members(), Err(Error::WrongType { .. })));
        assert_eq!(a.counter(b"c").unwrap(), 4, "a merged view wrote");
        let view = a.merged_view(b"absent", &[]).unwrap();
        assert!(view.record().is_none());
        assert!(view.encoded().is_none());
        assert!(matches!(
            a.merged_view(b"c", &[b"junk".to_vec()]),
            Err(Error::InvalidEntry { .. })
        ));
    }

    /// A chunk claiming a dot of the receiver's writer it never issued is
    /// refused alone: nothing of it lands, while the writes beside it in the
    /// group commit.
    #[test]
    fn a_refused_chunk_leaves_nothing_in_its_group() {
        let a = store(1);
        let b = store(2);
        b.put(b"k", b"from b", None).unwrap();
        let p = b.partition_of(b"k");
        let mut chunk = b
            .changes_since(p, &VersionVector::new())
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let mut claim = VersionVector::new();
        claim.add(crate::crdt::Dot::new(NodeId(1), 5));
        chunk.complete = Some(claim);
        let out = a
            .commit_group(&[GroupWrite::Chunk(chunk), add("c", 1)])
            .unwrap();
        assert!(
            matches!(out[0], Err(Error::UnissuedWrite { .. })),
            "{:?}",
            out[0]
        );
        assert!(a.get(b"k").unwrap().is_none(), "no entry of the chunk");
        assert_eq!(a.partition_version(p).unwrap().max_seq(NodeId(2)), 0);
        assert_eq!(a.counter(b"c").unwrap(), 1);
    }

    /// A drop decided on a covering vector keeps the partition when a write
    /// the vector lacks landed before its turn.
    #[test]
    fn a_drop_keeps_a_partition_that_gained_writes_since_the_decision() {
        let a = store(1);
        a.put(b"k", b"v1", None).unwrap();
        let p = a.partition_of(b"k");
        let covered_by = a.partition_version(p).unwrap();
        let out = a
            .commit_group(&[
                GroupWrite::Local(Op::Put {
                    key: b"k".to_vec(),
                    value: b"v2".to_vec(),
                    context: None,
                }),
                GroupWrite::Drop {
                    partition: p,
                    covered_by: covered_by.clone(),
                },
            ])
            .unwrap();
        assert!(
            matches!(out[1], Ok(GroupOutcome::Dropped(None))),
            "{:?}",
            out[1]
        );
        assert!(a.get(b"k").unwrap().is_some());
        let now = a.partition_version(p).unwrap();
        let out = a
            .commit_group(&[GroupWrite::Drop {
                partition: p,
                covered_by: now,
            }])
            .unwrap();
        assert!(
            matches!(out[0], Ok(GroupOutcome::Dropped(Some(1)))),
            "{:?}",
            out[0]
        );
        assert!(a.get(b"k").unwrap().is_none());
    }
}
