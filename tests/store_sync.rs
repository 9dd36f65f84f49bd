//! Model-checked sync: random operations on 2–4 stores, random partial and
//! interrupted syncs in random order, then a full sync. Afterwards every
//! store holds the same contents, and those contents are exactly what the
//! CRDT semantics say they must be:
//! - a register holds every write no other write has seen (siblings), and
//!   nothing that a later write superseded;
//! - a counter equals the sum of all its adds;
//! - a set holds every member with an addition no removal observed.
//!
//! Stores also hand partitions off and drop them (as a node does after a
//! layout change), then take them back through ordinary syncs. A store
//! refuses writes to a partition while it lacks any of its own earlier
//! writes there; every write it accepts is checked like any other, so a
//! write that claimed dots its writer no longer held (and so made the
//! replicas discard set adds, counter increments or siblings) fails here.

use gossipkv::crdt::Dot;
use gossipkv::store::ChunkLimits;
use gossipkv::sync::{pull, pull_partition};
use gossipkv::{CausalContext, NodeId, Record, Store, StoreOptions, Value, VersionVector};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const PARTITIONS: u16 = 4;
const REGISTERS: usize = 4;
const COUNTERS: usize = 2;
const SETS: usize = 2;
const MEMBERS: u8 = 4;

#[derive(Clone, Debug)]
enum Step {
    /// Read a register and keep its context, as a client would.
    Read { store: usize, key: usize },
    /// Write a register, with the kept context or blind.
    Put {
        store: usize,
        key: usize,
        with_context: bool,
    },
    Delete {
        store: usize,
        key: usize,
        with_context: bool,
    },
    CounterAdd {
        store: usize,
        key: usize,
        amount: i64,
    },
    SetAdd {
        store: usize,
        key: usize,
        member: u8,
    },
    SetRemove {
        store: usize,
        key: usize,
        member: u8,
    },
    /// Sync some partitions from one store to another, stopping after
    /// `cut` chunks when given (an interrupted stream).
    Sync {
        from: usize,
        to: usize,
        partitions: u8,
        cut: Option<usize>,
    },
    /// Apply again a chunk a store already applied.
    Replay { store: usize },
    /// Hand partitions off: sync them fully from `from` into `to`, then
    /// drop them from `from` (only if `to` now covers them, as the
    /// replication core's hand-off does).
    HandOff {
        from: usize,
        to: usize,
        partitions: u8,
    },
}

fn step(stores: usize) -> impl Strategy<Value = Step> {
    let s = 0..stores;
    prop_oneof![
        2 => (s.clone(), 0..REGISTERS).prop_map(|(store, key)| Step::Read { store, key }),
        4 => (s.clone(), 0..REGISTERS, any::<bool>())
            .prop_map(|(store, key, with_context)| Step::Put { store, key, with_context }),
        1 => (s.clone(), 0..REGISTERS, any::<bool>())
            .prop_map(|(store, key, with_context)| Step::Delete { store, key, with_context }),
        2 => (s.clone(), 0..COUNTERS, -50i64..50)
            .prop_map(|(store, key, amount)| Step::CounterAdd { store, key, amount }),
        2 => (s.clone(), 0..SETS, 0..MEMBERS)
            .prop_map(|(store, key, member)| Step::SetAdd { store, key, member }),
        1 => (s.clone(), 0..SETS, 0..MEMBERS)
            .prop_map(|(store, key, member)| Step::SetRemove { store, key, member }),
        3 => (s.clone(), s.clone(), 1u8..16, proptest::option::of(0usize..3))
            .prop_map(|(from, to, partitions, cut)| Step::Sync { from, to, partitions, cut }),
        1 => s.clone().prop_map(|store| Step::Replay { store }),
        1 => (s.clone(), s, 1u8..16)
            .prop_map(|(from, to, partitions)| Step::HandOff { from, to, partitions }),
    ]
}

fn scenario() -> impl Strategy<Value = (usize, Vec<Step>)> {
    (2usize..=4).prop_flat_map(|n| (Just(n), proptest::collection::vec(step(n), 1..80)))
}

fn register_key(i: usize) -> Vec<u8> {
    format!("reg{i}").into_bytes()
}
fn counter_key(i: usize) -> Vec<u8> {
    format!("ctr{i}").into_bytes()
}
fn set_key(i: usize) -> Vec<u8> {
    format!("set{i}").into_bytes()
}

/// A register write as the model sees it.
struct RegisterWrite {
    dot: Dot,
    /// What the write superseded: the context it carried, or the writing
    /// store's context of the key.
    seen: CausalContext,
    value: Option<Vec<u8>>,
}

#[derive(Default)]
struct Model {
    registers: BTreeMap<usize, Vec<RegisterWrite>>,
    counters: BTreeMap<usize, i64>,
    set_adds: BTreeMap<usize, Vec<(u8, Dot)>>,
    set_removes: BTreeMap<usize, Vec<(u8, CausalContext)>>,
}

impl Model {
    fn register(&self, key: usize) -> Option<Value> {
        let writes = self.registers.get(&key)?;
        let mut live: Vec<Vec<u8>> = writes
            .iter()
            .filter(|w| {
                !writes
                    .iter()
                    .any(|o| o.dot != w.dot && o.seen.covers(w.dot))
            })
            .filter_map(|w| w.value.clone())
            .collect();
        live.sort();
        live.dedup();
        (!live.is_empty()).then_some(Value::Register(live))
    }

    fn set(&self, key: usize) -> Vec<Vec<u8>> {
        let removes = self.set_removes.get(&key).map(Vec::as_slice).unwrap_or(&[]);
        let members: BTreeSet<Vec<u8>> = self
            .set_adds
            .get(&key)
            .into_iter()
            .flatten()
            .filter(|(m, dot)| {
                !removes
                    .iter()
                    .any(|(rm, seen)| rm == m && seen.covers(*dot))
            })
            .map(|(m, _)| vec![*m])
            .collect();
        members.into_iter().collect()
    }
}

/// A local write's outcome: `None` if the store refused it because it no
/// longer holds its own earlier writes of the partition (not acknowledged,
/// so the model ignores it). Such a refusal must match `Store::writable`
/// (a blind delete of a key the store never saw writes nothing and may
/// succeed anywhere).
fn accepted<T>(
    store: &Store,
    key: &[u8],
    write: impl FnOnce() -> gossipkv::Result<T>,
    wrote_nothing: impl FnOnce(&T) -> bool,
) -> Result<Option<T>, TestCaseError> {
    let writable = store.writable(store.partition_of(key));
    match write() {
        Ok(value) => {
            prop_assert!(
                writable || wrote_nothing(&value),
                "a write was accepted in a partition that is not writable"
            );
            Ok(Some(value))
        }
        Err(gossipkv::Error::OwnWritesMissing { .. }) => {
            prop_assert!(!writable, "a writable partition refused a write");
            Ok(None)
        }
        Err(e) => Err(TestCaseError::fail(format!("write failed: {e}"))),
    }
}

/// The dot a write got: its node's entry in the context it returned.
fn own_dot(store: &Store, context: &CausalContext) -> Dot {
    Dot::new(store.node_id(), context.get(store.node_id()))
}

/// The change index lists each entry of a partition once, every live key
/// among them, as stored; and the partition's stats count the same.
fn check_index(store: &Store) -> Result<(), TestCaseError> {
    let live: BTreeSet<Vec<u8>> = store
        .scan_prefix(b"")
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    let one_per_chunk = ChunkLimits {
        max_entries: 1,
        max_bytes: 1 << 20,
    };
    for p in 0..store.partitions() {
        let mut listed = BTreeSet::new();
        for chunk in store
            .changes_since_with(p, &VersionVector::new(), one_per_chunk)
            .unwrap()
        {
            for e in chunk.unwrap().entries {
                prop_assert_eq!(
                    store.entry_bytes(&e.key).unwrap(),
                    Some(e.entry.clone()),
                    "listed entry differs from the stored one"
                );
                prop_assert!(listed.insert(e.key), "an entry was listed twice");
            }
        }
        for key in live.iter().filter(|k| store.partition_of(k) == p) {
            prop_assert!(listed.contains(key), "a live key is missing from the index");
        }
        let stats = store.partition_stats(p).unwrap();
        prop_assert_eq!(stats.entries, listed.len() as u64, "partition stats");
    }
    Ok(())
}

fn dump(store: &Store) -> (Vec<(Vec<u8>, Record)>, Vec<VersionVector>) {
    let rows = store
        .scan_prefix(b"")
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let versions = (0..store.partitions())
        .map(|p| store.partition_version(p).unwrap())
        .collect();
    (rows, versions)
}

/// `log_rows`: the stores' change log size, so that cases run with the
/// index folded at every commit, now and then, and never.
fn run(n: usize, steps: &[Step], log_rows: u64) -> Result<(), TestCaseError> {
    let stores: Vec<Store> = (0..n)
        .map(|i| {
            let options = StoreOptions::default()
                .node_id(NodeId(i as u64 + 1))
                .partitions(PARTITIONS)
                .change_log_rows(log_rows);
            Store::open_in_memory(options).unwrap()
        })
        .collect();
    let mut model = Model::default();
    let mut kept: BTreeMap<(usize, usize), CausalContext> = BTreeMap::new();
    let mut last_chunk: BTreeMap<usize, gossipkv::store::ChangeChunk> = BTreeMap::new();
    let mut value_counter = 0u32;

    for step in steps {
        match *step {
            Step::Read { store, key } => {
                let context = stores[store]
                    .get(&register_key(key))
                    .unwrap()
                    .map(|r| r.context)
                    .unwrap_or_default();
                kept.insert((store, key), context);
            }
            Step::Put {
                store,
                key,
                with_context,
            }
            | Step::Delete {
                store,
                key,
                with_context,
            } => {
                let s = &stores[store];
                let context = if with_context {
                    kept.get(&(store, key)).cloned()
                } else {
                    None
                };
                let value = matches!(step, Step::Put { .. }).then(|| {
                    value_counter += 1;
                    format!("v{value_counter}").into_bytes()
                });
                let k = register_key(key);
                let write = || match &value {
                    Some(v) => s.put(&k, v, context.as_ref()),
                    None => s.delete(&k, context.as_ref()),
                };
                let Some(after) = accepted(s, &k, write, CausalContext::is_empty)? else {
                    continue;
                };
                if after.is_empty() {
                    continue; // a blind delete of a key this store never saw
                }
                let seen = context.unwrap_or_else(|| after.clone());
                let dot = own_dot(s, &after);
                model
                    .registers
                    .entry(key)
                    .or_default()
                    .push(RegisterWrite { dot, seen, value });
            }
            Step::CounterAdd { store, key, amount } => {
                let s = &stores[store];
                let k = counter_key(key);
                if accepted(s, &k, || s.counter_add(&k, amount), |_| false)?.is_some() {
                    *model.counters.entry(key).or_default() += amount;
                }
            }
            Step::SetAdd { store, key, member } => {
                let s = &stores[store];
                let k = set_key(key);
                let Some(after) = accepted(s, &k, || s.set_add(&k, &[member]), |_| false)? else {
                    continue;
                };
                model
                    .set_adds
                    .entry(key)
                    .or_default()
                    .push((member, own_dot(s, &after)));
            }
            Step::SetRemove { store, key, member } => {
                let s = &stores[store];
                let before = s
                    .get(&set_key(key))
                    .unwrap()
                    .map(|r| r.context)
                    .unwrap_or_default();
                let k = set_key(key);
                if accepted(s, &k, || s.set_remove(&k, &[member]), |_| false)?.is_none() {
                    continue;
                }
                model
                    .set_removes
                    .entry(key)
                    .or_default()
                    .push((member, before));
            }
            Step::Sync {
                from,
                to,
                partitions,
                cut,
            } => {
                if from == to {
                    continue;
                }
                let limits = ChunkLimits {
                    max_entries: 2,
                    max_bytes: 1 << 20,
                };
                for p in (0..PARTITIONS).filter(|p| partitions & (1 << p) != 0) {
                    let since = stores[to].partition_version(p).unwrap();
                    let stream = stores[from].changes_since_with(p, &since, limits).unwrap();
                    for chunk in stream.take(cut.unwrap_or(usize::MAX)) {
                        let chunk = chunk.unwrap();
                        stores[to].apply(&chunk).unwrap();
                        last_chunk.insert(to, chunk);
                    }
                }
            }
            Step::HandOff {
                from,
                to,
                partitions,
            } => {
                if from == to {
                    continue;
                }
                for p in (0..PARTITIONS).filter(|p| partitions & (1 << p) != 0) {
                    pull_partition(&stores[from], &stores[to], p, ChunkLimits::default()).unwrap();
                    let own = stores[from].partition_version(p).unwrap();
                    if stores[to].partition_version(p).unwrap().dominates(&own) {
                        stores[from].drop_partition(p).unwrap();
                        let left = stores[from]
                            .scan_prefix(b"")
                            .unwrap()
                            .filter(|r| stores[from].partition_of(&r.as_ref().unwrap().0) == p)
                            .count();
                        prop_assert_eq!(left, 0, "a dropped partition kept live keys");
                        prop_assert_eq!(stores[from].partition_stats(p).unwrap().entries, 0);
                        // Its last chunk may be of a dropped partition.
                        last_chunk.remove(&from);
                    }
                }
            }
            Step::Replay { store } => {
                if let Some(chunk) = last_chunk.get(&store) {
                    let before = dump(&stores[store]);
                    let report = stores[store].apply(chunk).unwrap();
                    prop_assert_eq!(report.merged, 0, "a replayed chunk merged something");
                    prop_assert_eq!(
                        &dump(&stores[store]),
                        &before,
                        "replaying a chunk changed the store"
                    );
                }
            }
        }
    }

    for store in &stores {
        check_index(store)?;
    }
    // Full sync: everything into store 0, then store 0 into everyone.
    for i in 1..n {
        pull(&stores[i], &stores[0]).unwrap();
    }
    for i in 1..n {
        pull(&stores[0], &stores[i]).unwrap();
    }

    for store in &stores {
        check_index(store)?;
    }
    let reference = dump(&stores[0]);
    for (i, store) in stores.iter().enumerate().skip(1) {
        prop_assert_eq!(&dump(store), &reference, "store {} differs from store 0", i);
    }
    // Synced stores have nothing to send each other.
    for p in 0..PARTITIONS {
        let report = pull_partition(&stores[1], &stores[0], p, ChunkLimits::default()).unwrap();
        prop_assert_eq!(report.entries, 0);
    }

    let store = &stores[0];
    for key in 0..REGISTERS {
        let value = store.get(&register_key(key)).unwrap().map(|r| r.value);
        prop_assert_eq!(value, model.register(key), "register {}", key);
    }
    for key in 0..COUNTERS {
        let expected = model.counters.get(&key).copied().unwrap_or(0);
        prop_assert_eq!(
            store.counter(&counter_key(key)).unwrap(),
            expected,
            "counter {}",
            key
        );
    }
    for key in 0..SETS {
        prop_assert_eq!(
            store.set_members(&set_key(key)).unwrap(),
            model.set(key),
            "set {}",
            key
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn synced_stores_converge_to_the_crdt_semantics(
        (n, steps) in scenario(),
        log_rows in prop_oneof![Just(0u64), Just(16), Just(40), Just(1_000_000)],
    ) {
        run(n, &steps, log_rows)?;
    }
}

/// The classic lost-update case, spelled out: two stores write the same key
/// concurrently; after sync both writes are siblings on both; a write with
/// the merged context replaces both everywhere.
#[test]
fn concurrent_register_writes_become_siblings_until_superseded() {
    let a = Store::open_in_memory(StoreOptions::default().node_id(NodeId(1))).unwrap();
    let b = Store::open_in_memory(StoreOptions::default().node_id(NodeId(2))).unwrap();
    a.put(b"k", b"from a", None).unwrap();
    b.put(b"k", b"from b", None).unwrap();
    gossipkv::sync::sync(&a, &b).unwrap();
    let expected = Value::Register(vec![b"from a".to_vec(), b"from b".to_vec()]);
    assert_eq!(a.get(b"k").unwrap().unwrap().value, expected);
    assert_eq!(b.get(b"k").unwrap().unwrap().value, expected);
    let context = b.get(b"k").unwrap().unwrap().context;
    b.put(b"k", b"resolved", Some(&context)).unwrap();
    gossipkv::sync::sync(&a, &b).unwrap();
    let resolved = Value::Register(vec![b"resolved".to_vec()]);
    assert_eq!(a.get(b"k").unwrap().unwrap().value, resolved);
}

/// A context naming writes the coordinating store has not seen (a token
/// of another key, a forged one, or a read from a replica further ahead)
/// must not make those writes count as superseded. B writes `k` (its
/// dot 1) and then `other` four times (dots 2 to 5) in the same partition;
/// a client puts `k` on A with `other`'s context, which claims B's writes up
/// to 5. A has seen none of B's writes, so B's value of `k` must survive
/// the sync beside A's, on both stores, and a later write with the merged
/// context resolves both.
#[test]
fn a_context_naming_writes_the_store_never_saw_supersedes_none_of_them() {
    let options = |node| StoreOptions::default().node_id(NodeId(node)).partitions(1);
    let a = Store::open_in_memory(options(1)).unwrap();
    let b = Store::open_in_memory(options(2)).unwrap();
    b.put(b"k", b"from b", None).unwrap();
    let mut other = CausalContext::new();
    for i in 0..4u8 {
        other = b.put(b"other", &[i], None).unwrap();
    }
    assert_eq!(other.get(NodeId(2)), 5);
    let written = a.put(b"k", b"from a", Some(&other)).unwrap();
    assert_eq!(
        written.get(NodeId(2)),
        0,
        "A's entry claims writes of B it never saw"
    );
    gossipkv::sync::sync(&a, &b).unwrap();
    let both = Value::Register(vec![b"from a".to_vec(), b"from b".to_vec()]);
    for store in [&a, &b] {
        assert_eq!(store.get(b"k").unwrap().unwrap().value, both);
    }
    // With a context that A now holds, the client's write supersedes both.
    let merged = a.get(b"k").unwrap().unwrap().context;
    a.put(b"k", b"resolved", Some(&merged)).unwrap();
    gossipkv::sync::sync(&a, &b).unwrap();
    for store in [&a, &b] {
        assert_eq!(
            store.get(b"k").unwrap().unwrap().value,
            Value::Register(vec![b"resolved".to_vec()])
        );
    }
}

/// Issue 8's incident with the store API alone: A adds two members, B
/// copies them, A drops the partition (a hand-off), then A is asked to add
/// a third. Had A taken it, its entry would claim "seen A's writes up to
/// 3" without the first two, and B would read them as removed. A refuses;
/// once it has synced the partition back it takes the write, and nothing
/// is lost anywhere.
#[test]
fn a_dropped_partition_refuses_writes_until_synced_back() {
    let a = Store::open_in_memory(StoreOptions::default().node_id(NodeId(1))).unwrap();
    let b = Store::open_in_memory(StoreOptions::default().node_id(NodeId(2))).unwrap();
    a.set_add(b"tags", b"x").unwrap();
    a.set_add(b"tags", b"y").unwrap();
    a.counter_add(b"tags-count", 2).unwrap();
    gossipkv::sync::pull(&a, &b).unwrap();
    let p = a.partition_of(b"tags");
    a.drop_partition(p).unwrap();
    assert!(!a.writable(p));
    match a.set_add(b"tags", b"z") {
        Err(gossipkv::Error::OwnWritesMissing {
            partition,
            held: 0,
            issued: 2,
        }) => assert_eq!(partition, p),
        other => panic!("expected OwnWritesMissing, got {other:?}"),
    }
    // A partition A never dropped stays writable.
    let q = a.partition_of(b"tags-count");
    if q != p {
        assert!(a.writable(q));
    }
    gossipkv::sync::sync(&a, &b).unwrap();
    assert_eq!(
        b.set_members(b"tags").unwrap(),
        vec![b"x".to_vec(), b"y".to_vec()]
    );
    // Synced back, A holds its own writes again and may write.
    assert!(a.writable(p));
    a.set_add(b"tags", b"z").unwrap();
    gossipkv::sync::sync(&a, &b).unwrap();
    let all = vec![b"x".to_vec(), b"y".to_vec(), b"z".to_vec()];
    assert_eq!(a.set_members(b"tags").unwrap(), all);
    assert_eq!(b.set_members(b"tags").unwrap(), all);
}
