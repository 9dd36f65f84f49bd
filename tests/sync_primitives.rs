//! The sync primitives one by one: `changes_since` lists exactly what a
//! vector lacks, chunks are bounded, an interrupted stream resumes where it
//! stopped, `apply` only claims what is safe, tombstones purge once stable,
//! and LWW registers follow the hybrid clock.

use gossipkv::crdt::{Dot, WallClock};
use gossipkv::store::{ChangeChunk, ChunkLimits};
use gossipkv::sync::{pull, sync};
use gossipkv::{NodeId, Store, StoreOptions, Value, VersionVector};
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

fn store(node: u64, partitions: u16) -> Store {
    let options = StoreOptions::default()
        .node_id(NodeId(node))
        .partitions(partitions);
    Store::open_in_memory(options).unwrap()
}

fn listed(
    store: &Store,
    partition: u16,
    since: &VersionVector,
    limits: ChunkLimits,
) -> Vec<ChangeChunk> {
    store
        .changes_since_with(partition, since, limits)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn keys_of(chunks: &[ChangeChunk]) -> Vec<Vec<u8>> {
    chunks
        .iter()
        .flat_map(|c| c.entries.iter().map(|e| e.key.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// For any vector a peer may hold, `changes_since` returns each entry
    /// with a dot the vector lacks exactly once, and nothing else.
    #[test]
    fn changes_since_lists_every_uncovered_entry_and_no_covered_one(
        writes in proptest::collection::vec((0usize..3, 0u8..24, any::<bool>()), 1..120),
        snapshot_at in proptest::collection::vec(0usize..120, 1..4),
    ) {
        let stores = [store(1, 2), store(2, 2), store(3, 2)];
        let mut snapshots = Vec::new();
        for (i, &(s, key, delete)) in writes.iter().enumerate() {
            let key = [b'k', key];
            if delete {
                stores[s].delete(&key, None).unwrap();
            } else {
                stores[s].put(&key, &[i as u8], None).unwrap();
            }
            if i % 7 == 0 {
                pull(&stores[s], &stores[(s + 1) % 3]).unwrap();
            }
            if snapshot_at.contains(&i) {
                snapshots.push((0..2).map(|p| stores[0].partition_version(p).unwrap()).collect::<Vec<_>>());
            }
        }
        snapshots.push(vec![VersionVector::new(), VersionVector::new()]);
        let all_keys: BTreeSet<Vec<u8>> = writes.iter().map(|&(_, k, _)| vec![b'k', k]).collect();
        for source in &stores {
            for since in &snapshots {
                for p in 0..2u16 {
                    let chunks = listed(source, p, &since[p as usize], ChunkLimits { max_entries: 3, max_bytes: 1 << 20 });
                    let got = keys_of(&chunks);
                    let unique: BTreeSet<Vec<u8>> = got.iter().cloned().collect();
                    prop_assert_eq!(unique.len(), got.len(), "an entry was listed twice");
                    let expected: BTreeSet<Vec<u8>> = all_keys
                        .iter()
                        .filter(|k| source.partition_of(k) == p)
                        .filter(|k| {
                            source.causal_context(k).unwrap().is_some_and(|ctx| {
                                ctx.dots().any(|d| !since[p as usize].covers(d))
                            })
                        })
                        .cloned()
                        .collect();
                    prop_assert_eq!(unique, expected);
                    prop_assert!(chunks.iter().all(|c| c.entries.len() <= 3));
                    prop_assert!(chunks.last().unwrap().complete.is_some());
                    prop_assert!(chunks[..chunks.len() - 1].iter().all(|c| c.complete.is_none()));
                }
            }
        }
    }
}

#[test]
fn chunks_respect_the_byte_limit_and_an_oversized_entry_goes_alone() {
    let a = store(1, 1);
    for i in 0..20u8 {
        a.put(&[b'k', i], &[i; 100], None).unwrap();
    }
    a.put(b"big", &[7; 5000], None).unwrap();
    let limits = ChunkLimits {
        max_entries: 1000,
        max_bytes: 450,
    };
    let chunks = listed(&a, 0, &VersionVector::new(), limits);
    assert_eq!(keys_of(&chunks).len(), 21);
    for chunk in &chunks {
        // A chunk stops at the first entry that reaches the limit.
        let bytes = chunk.payload_bytes();
        let largest = chunk
            .entries
            .iter()
            .map(|e| e.key.len() + e.entry.len())
            .max()
            .unwrap_or(0);
        assert!(bytes < 450 + largest, "chunk of {bytes} bytes");
    }
    assert!(chunks
        .iter()
        .any(|c| c.entries.len() == 1 && c.entries[0].key == b"big"));
}

#[test]
fn an_interrupted_stream_resumes_from_what_arrived() {
    let source = store(1, 1);
    let receiver = store(2, 1);
    for i in 0..100u8 {
        source.put(&[i], b"v", None).unwrap();
    }
    let limits = ChunkLimits {
        max_entries: 10,
        max_bytes: 1 << 20,
    };
    let stream = source
        .changes_since_with(0, &VersionVector::new(), limits)
        .unwrap();
    for chunk in stream.take(3) {
        receiver.apply(&chunk.unwrap()).unwrap();
    }
    let since = receiver.partition_version(0).unwrap();
    // Only the dots that arrived are claimed, not the source's whole vector.
    assert_eq!(since.base(NodeId(1)), 30);
    let rest = listed(&source, 0, &since, limits);
    assert_eq!(
        keys_of(&rest).len(),
        70,
        "the resumed stream re-sent entries"
    );
    for chunk in &rest {
        receiver.apply(chunk).unwrap();
    }
    assert_eq!(
        receiver.partition_version(0).unwrap(),
        source.partition_version(0).unwrap()
    );
}

#[test]
fn apply_claims_out_of_order_dots_without_filling_the_gaps() {
    let a = store(1, 1);
    let b = store(2, 1);
    a.put(b"x", b"1", None).unwrap(); // dot 1
    a.put(b"y", b"1", None).unwrap(); // dot 2
    a.put(b"x", b"2", None).unwrap(); // dot 3 supersedes dot 1
                                      // Deliver only the entry for x (dot 3), as a cut stream would.
    let chunks = listed(
        &a,
        0,
        &VersionVector::new(),
        ChunkLimits {
            max_entries: 1,
            max_bytes: 1 << 20,
        },
    );
    let x_chunk = chunks
        .iter()
        .find(|c| c.entries.iter().any(|e| e.key == b"x"))
        .unwrap();
    let mut partial = x_chunk.clone();
    partial.complete = None;
    b.apply(&partial).unwrap();
    let vv = b.partition_version(0).unwrap();
    assert!(vv.covers(Dot::new(NodeId(1), 3)));
    assert!(
        !vv.covers(Dot::new(NodeId(1), 2)),
        "claimed a dot it never received"
    );
    // The next exchange sends y and nothing already held.
    let rest = listed(&a, 0, &vv, ChunkLimits::default());
    assert_eq!(keys_of(&rest), vec![b"y".to_vec()]);
}

#[test]
fn purged_tombstones_do_not_come_back_from_a_stale_copy() {
    let a = store(1, 4);
    let b = store(2, 4);
    a.put(b"gone", b"v", None).unwrap();
    let p = a.partition_of(b"gone");
    let stale = listed(&a, p, &VersionVector::new(), ChunkLimits::default());
    sync(&a, &b).unwrap();
    a.delete(b"gone", None).unwrap();
    sync(&a, &b).unwrap();
    assert!(b.get(b"gone").unwrap().is_none());
    assert!(
        b.causal_context(b"gone").unwrap().is_some(),
        "tombstone kept until stable"
    );

    let stable = a
        .partition_version(p)
        .unwrap()
        .meet(&b.partition_version(p).unwrap());
    assert_eq!(a.purge(p, &stable).unwrap(), 1);
    assert_eq!(b.purge(p, &stable).unwrap(), 1);
    assert!(a.causal_context(b"gone").unwrap().is_none());

    for chunk in &stale {
        let report = a.apply(chunk).unwrap();
        assert_eq!(report.merged, 0);
    }
    assert!(
        a.causal_context(b"gone").unwrap().is_none(),
        "a purged key was resurrected"
    );
}

#[test]
fn a_tombstone_not_yet_seen_everywhere_is_not_purged() {
    let a = store(1, 1);
    let b = store(2, 1);
    a.put(b"k", b"v", None).unwrap();
    sync(&a, &b).unwrap();
    a.delete(b"k", None).unwrap();
    // b has not seen the delete: the stable vector does not cover it.
    let stable = a
        .partition_version(0)
        .unwrap()
        .meet(&b.partition_version(0).unwrap());
    assert_eq!(a.purge(0, &stable).unwrap(), 0);
    assert!(a.causal_context(b"k").unwrap().is_some());
}

/// crdts issue 160: a remove context does not bump the clock, so a delta
/// sync can drop removals. Removals here carry their own dot and move with
/// the whole entry.
#[test]
fn set_removals_replicate_and_a_concurrent_add_wins() {
    let a = store(1, 8);
    let b = store(2, 8);
    a.set_add(b"s", b"m").unwrap();
    a.set_add(b"s", b"n").unwrap();
    sync(&a, &b).unwrap();
    a.set_remove(b"s", b"m").unwrap();
    b.set_add(b"s", b"n").unwrap(); // concurrent re-add of n
    a.set_remove(b"s", b"n").unwrap();
    sync(&a, &b).unwrap();
    assert_eq!(a.set_members(b"s").unwrap(), vec![b"n".to_vec()]);
    assert_eq!(b.set_members(b"s").unwrap(), vec![b"n".to_vec()]);
}

#[test]
fn a_blind_delete_keeps_a_concurrent_write() {
    let a = store(1, 8);
    let b = store(2, 8);
    a.put(b"k", b"old", None).unwrap();
    sync(&a, &b).unwrap();
    a.delete(b"k", None).unwrap();
    b.put(b"k", b"new", None).unwrap();
    sync(&a, &b).unwrap();
    for s in [&a, &b] {
        assert_eq!(
            s.get(b"k").unwrap().unwrap().value,
            Value::Register(vec![b"new".to_vec()])
        );
    }
}

struct ManualClock(AtomicU64);
impl WallClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

fn clocked(node: u64, ms: u64) -> (Store, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock(AtomicU64::new(ms)));
    let options = StoreOptions::default()
        .node_id(NodeId(node))
        .clock(clock.clone());
    (Store::open_in_memory(options).unwrap(), clock)
}

#[test]
fn lww_orders_by_hybrid_clock_even_when_a_wall_clock_lags() {
    let (ahead, _) = clocked(1, 10_000);
    let (behind, _) = clocked(2, 5_000);
    ahead.put_lww(b"k", b"first").unwrap();
    sync(&ahead, &behind).unwrap();
    // Written after seeing "first", so it wins despite the lagging clock.
    behind.put_lww(b"k", b"second").unwrap();
    sync(&ahead, &behind).unwrap();
    for s in [&ahead, &behind] {
        assert_eq!(
            s.get(b"k").unwrap().unwrap().value,
            Value::Lww(b"second".to_vec())
        );
    }
}

#[test]
fn lww_ties_break_by_node_id_the_same_everywhere() {
    let (low, _) = clocked(1, 7_000);
    let (high, _) = clocked(2, 7_000);
    low.put_lww(b"k", b"low").unwrap();
    high.put_lww(b"k", b"high").unwrap();
    sync(&low, &high).unwrap();
    for s in [&low, &high] {
        assert_eq!(
            s.get(b"k").unwrap().unwrap().value,
            Value::Lww(b"high".to_vec())
        );
    }
}

#[test]
fn the_hybrid_clock_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let clock = Arc::new(ManualClock(AtomicU64::new(9_000)));
    let options = StoreOptions::default()
        .node_id(NodeId(1))
        .clock(clock.clone());
    {
        let s = Store::open(&path, options.clone()).unwrap();
        s.put_lww(b"k", b"before restart").unwrap();
    }
    // The wall clock stepped back across the restart.
    clock.0.store(1_000, Ordering::SeqCst);
    let s = Store::open(&path, options).unwrap();
    s.put_lww(b"k", b"after restart").unwrap();
    assert_eq!(
        s.get(b"k").unwrap().unwrap().value,
        Value::Lww(b"after restart".to_vec())
    );
}

#[test]
fn a_dropped_partition_never_reuses_its_sequence_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let options = StoreOptions::default().node_id(NodeId(1)).partitions(1);
    let peer = store(2, 1);
    {
        let a = Store::open(&path, options.clone()).unwrap();
        a.put(b"k", b"before", None).unwrap();
        a.put(b"j", b"before", None).unwrap();
        sync(&a, &peer).unwrap();
        assert_eq!(a.drop_partition(0).unwrap(), 2);
        assert!(a.get(b"k").unwrap().is_none());
        assert!(a.partition_version(0).unwrap().is_empty());
    }
    // Even across a restart, the store remembers what it issued: it refuses
    // writes until it holds its own earlier writes again, and then continues
    // above them, so the peer never takes a new write for one it has.
    let a = Store::open(&path, options).unwrap();
    assert!(matches!(
        a.put(b"x", b"after", None),
        Err(gossipkv::Error::OwnWritesMissing { issued: 2, .. })
    ));
    pull(&peer, &a).unwrap();
    assert_eq!(
        a.get(b"k").unwrap().unwrap().value,
        Value::Register(vec![b"before".to_vec()])
    );
    let context = a.put(b"x", b"after", None).unwrap();
    assert_eq!(context.get(NodeId(1)), 3);
    pull(&a, &peer).unwrap();
    assert_eq!(
        peer.get(b"x").unwrap().unwrap().value,
        Value::Register(vec![b"after".to_vec()])
    );
}

#[test]
fn partition_stats_count_entries_and_bytes() {
    let a = store(1, 2);
    for i in 0..50u8 {
        a.put(&[i], &[0; 10], None).unwrap();
    }
    let total: u64 = (0..2).map(|p| a.partition_stats(p).unwrap().entries).sum();
    assert_eq!(total, 50);
    let bytes: u64 = (0..2).map(|p| a.partition_stats(p).unwrap().bytes).sum();
    assert!(bytes > 50 * 11);
}
