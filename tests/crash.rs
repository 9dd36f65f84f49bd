//! Crash consistency of the store (issue 8, point 6): power loss at every
//! `sync_data` of a workload, simulated at redb's storage layer.
//!
//! `PowerLossDisk` keeps the bytes that are durable (as of the last
//! successful `sync_data`) apart from the writes made since. A crash image
//! is the durable bytes plus some of the unsynced writes: none, all, or a
//! seeded-random subset of their 4 KiB pages (a torn page cache). The disk
//! can be armed to fail its N-th `sync_data`; that call and every later
//! write and sync return an I/O error, so nothing after it reaches the disk.
//!
//! The workload runs once on a healthy disk to count its syncs and record
//! the store's state after each step. Then for every sync N it runs again
//! with the disk failing at N, stops at the first failed step, and reopens
//! every crash image on a fresh disk. `check_image` then requires that
//! (a) the store opens; (b) every acknowledged write is there, against a
//! model; (c) the failed step is there whole or not at all; (d) each
//! partition's change stream from the empty vector names exactly the keys
//! the store holds there, and new writes get dots above every own dot
//! handed out before; (e) a sync with the second replica converges.

use gossipkv::crdt::{CausalContext, NodeId, Record, Value, VersionVector, WallClock};
use gossipkv::store::{Batch, Durability, GroupOutcome, GroupWrite, Op, Store, StoreOptions};
use gossipkv::Error;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const PARTITIONS: u16 = 4;
/// The partition the workload drops and syncs back.
const DROPPED: u16 = 2;
const PAGE: usize = 4096;

// ---------------------------------------------------------------------------
// The simulated disk

#[derive(Clone, Debug)]
enum Unsynced {
    Write { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

#[derive(Default)]
struct DiskState {
    /// What survives a power loss for sure.
    durable: Vec<u8>,
    /// What reads see: durable plus every write since the last sync.
    current: Vec<u8>,
    /// The writes since the last successful sync, in order.
    unsynced: Vec<Unsynced>,
    syncs: u64,
    /// Fail this sync (1-based) and everything after it.
    fail_at: Option<u64>,
    failed: bool,
    /// Acknowledge syncs without making anything durable (a lying disk).
    lying: bool,
}

/// A redb backend that models a disk losing power. Clones share the disk.
#[derive(Clone, Default)]
struct PowerLossDisk(Arc<Mutex<DiskState>>);

impl fmt::Debug for PowerLossDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("PowerLossDisk")
            .field("len", &state.current.len())
            .field("syncs", &state.syncs)
            .finish()
    }
}

/// Which unsynced writes a crash image keeps.
#[derive(Copy, Clone, Debug)]
enum Survivors {
    None,
    All,
    /// Each page of each write survives with probability 1/2.
    Torn(u64),
}

impl PowerLossDisk {
    fn from_image(image: Vec<u8>) -> Self {
        PowerLossDisk(Arc::new(Mutex::new(DiskState {
            durable: image.clone(),
            current: image,
            ..DiskState::default()
        })))
    }

    fn failing_at(sync: u64) -> Self {
        let disk = Self::default();
        disk.state().fail_at = Some(sync);
        disk
    }

    fn lying() -> Self {
        let disk = Self::default();
        disk.state().lying = true;
        disk
    }

    fn state(&self) -> MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn syncs(&self) -> u64 {
        self.state().syncs
    }

    fn failed(&self) -> bool {
        self.state().failed
    }

    /// The bytes the disk would hold after losing power now.
    fn crash_image(&self, survivors: Survivors) -> Vec<u8> {
        let state = self.state();
        let mut image = state.durable.clone();
        let mut rng = match survivors {
            Survivors::Torn(seed) => Some(XorShift::new(seed)),
            _ => None,
        };
        let keep = |rng: &mut Option<XorShift>| match survivors {
            Survivors::None => false,
            Survivors::All => true,
            Survivors::Torn(_) => rng.as_mut().is_some_and(|r| r.next() & 1 == 1),
        };
        for op in &state.unsynced {
            match op {
                Unsynced::SetLen(len) => {
                    if keep(&mut rng) {
                        image.resize(*len, 0);
                    }
                }
                Unsynced::Write { offset, data } => {
                    // A write reaches the disk page by page.
                    let mut at = *offset;
                    let mut rest: &[u8] = data;
                    while !rest.is_empty() {
                        let len = (PAGE - at % PAGE).min(rest.len());
                        let (piece, tail) = rest.split_at(len);
                        if keep(&mut rng) {
                            if image.len() < at + len {
                                image.resize(at + len, 0);
                            }
                            image[at..at + len].copy_from_slice(piece);
                        }
                        at += len;
                        rest = tail;
                    }
                }
            }
        }
        image
    }
}

fn io_error() -> io::Error {
    io::Error::other("simulated power loss: the disk is gone")
}

impl redb::StorageBackend for PowerLossDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.state().current.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let state = self.state();
        let offset = usize::try_from(offset).map_err(io::Error::other)?;
        match state.current.get(offset..offset + out.len()) {
            Some(bytes) => {
                out.copy_from_slice(bytes);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end",
            )),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut state = self.state();
        if state.failed {
            return Err(io_error());
        }
        let len = usize::try_from(len).map_err(io::Error::other)?;
        state.current.resize(len, 0);
        state.unsynced.push(Unsynced::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut state = self.state();
        if state.failed {
            return Err(io_error());
        }
        state.syncs += 1;
        if state.fail_at == Some(state.syncs) {
            state.failed = true;
            return Err(io_error());
        }
        if !state.lying {
            state.durable = state.current.clone();
            state.unsynced.clear();
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut state = self.state();
        if state.failed {
            return Err(io_error());
        }
        let offset = usize::try_from(offset).map_err(io::Error::other)?;
        if state.current.len() < offset + data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end",
            ));
        }
        state.current[offset..offset + data.len()].copy_from_slice(data);
        state.unsynced.push(Unsynced::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }
}

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

// ---------------------------------------------------------------------------
// The workload

struct FixedClock;

impl WallClock for FixedClock {
    fn now_ms(&self) -> u64 {
        1_000_000
    }
}

fn options(node: NodeId) -> StoreOptions {
    StoreOptions::default()
        .node_id(node)
        .partitions(PARTITIONS)
        .durability(Durability::Immediate)
        .clock(Arc::new(FixedClock))
}

fn partition_of(key: &[u8]) -> u16 {
    gossipkv::store::partition_of(key, PARTITIONS)
}

/// The `i`-th key named `{prefix}{n}` that falls in `partition`.
fn key_in(partition: u16, prefix: &str, i: usize) -> Vec<u8> {
    (0u32..)
        .map(|n| format!("{prefix}{n}").into_bytes())
        .filter(|k| partition_of(k) == partition)
        .nth(i)
        .expect("keys exist in every partition")
}

#[derive(Clone, Debug)]
enum BatchOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Counter(Vec<u8>, i64),
    SetAdd(Vec<u8>, Vec<u8>),
    SetRemove(Vec<u8>, Vec<u8>),
}

#[derive(Clone, Debug)]
enum Step {
    Put(Vec<u8>, Vec<u8>),
    /// Put with the context the store last reported for the key.
    PutWithContext(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    Counter(Vec<u8>, i64),
    SetAdd(Vec<u8>, Vec<u8>),
    SetRemove(Vec<u8>, Vec<u8>),
    Batch(Vec<BatchOp>),
    /// Two-way sync with the second replica.
    Sync,
    /// Purge the tombstones both replicas have seen, on both.
    Purge,
    Drop(u16),
    /// A write to a dropped partition, which must be refused.
    RefusedPut(Vec<u8>),
}

impl Step {
    /// Whether the step commits more than one transaction.
    fn spans_transactions(&self) -> bool {
        matches!(self, Step::Sync | Step::Purge)
    }
}

fn workload() -> Vec<Step> {
    let k = |p: u16, i: usize| key_in(p, "k", i);
    let v = |s: &str| s.as_bytes().to_vec();
    let mut steps = Vec::new();
    for p in 0..PARTITIONS {
        steps.push(Step::Put(k(p, 0), v(&format!("r{p}a"))));
        steps.push(Step::Counter(k(p, 1), 5 + i64::from(p)));
        steps.push(Step::SetAdd(k(p, 2), v("x")));
    }
    steps.push(Step::Sync);
    for p in 0..PARTITIONS {
        steps.push(Step::PutWithContext(k(p, 0), v(&format!("r{p}b"))));
        steps.push(Step::Counter(k(p, 1), -3));
        steps.push(Step::SetAdd(k(p, 2), v("y")));
        steps.push(Step::SetRemove(k(p, 2), v("x")));
        steps.push(Step::Put(k(p, 3), v("doomed")));
        steps.push(Step::Delete(k(p, 3)));
    }
    steps.push(Step::Batch(vec![
        BatchOp::Put(k(0, 4), v("b1")),
        BatchOp::Counter(k(1, 1), 100),
        BatchOp::SetAdd(k(DROPPED, 2), v("z")),
        BatchOp::Put(k(3, 4), v("b1")),
    ]));
    steps.push(Step::Sync);
    steps.push(Step::Purge);
    steps.push(Step::Batch(vec![
        BatchOp::Delete(k(0, 4)),
        BatchOp::SetRemove(k(DROPPED, 2), v("y")),
        BatchOp::Counter(k(3, 1), -1),
        BatchOp::Put(k(1, 5), v("b2")),
    ]));
    steps.push(Step::Sync);
    steps.push(Step::Drop(DROPPED));
    steps.push(Step::RefusedPut(k(DROPPED, 6)));
    steps.push(Step::Put(k(0, 6), v("during drop")));
    steps.push(Step::Sync);
    steps.push(Step::Put(k(DROPPED, 6), v("after sync back")));
    steps.push(Step::Batch(vec![
        BatchOp::Put(k(DROPPED, 0), v("b3")),
        BatchOp::Counter(k(DROPPED, 1), 7),
        BatchOp::SetAdd(k(1, 2), v("w")),
    ]));
    steps.push(Step::Delete(k(1, 0)));
    steps.push(Step::Put(k(1, 0), v("reborn")));
    steps
}

/// Every key the workload or the checks touch, so that tombstones (which
/// `scan_prefix` does not show) can be found through `causal_context`.
fn key_universe() -> BTreeSet<Vec<u8>> {
    let mut keys = BTreeSet::new();
    for p in 0..PARTITIONS {
        for i in 0..8 {
            keys.insert(key_in(p, "k", i));
            keys.insert(key_in(p, "b", i));
            keys.insert(key_in(p, "fresh", i));
        }
    }
    keys
}

/// The second replica's own writes, made before the workload.
fn seed_replica(b: &Store) -> Result<(), Error> {
    for p in 0..PARTITIONS {
        b.put(&key_in(p, "b", 0), format!("from b {p}").as_bytes(), None)?;
        b.counter_add(&key_in(p, "b", 1), 40)?;
    }
    Ok(())
}

/// What one step handed back to the caller: the contexts of its writes.
type Contexts = Vec<(Vec<u8>, CausalContext)>;

fn run_step(a: &Store, b: &Store, step: &Step) -> Result<Contexts, Error> {
    let one = |key: &[u8], ctx: CausalContext| vec![(key.to_vec(), ctx)];
    Ok(match step {
        Step::Put(key, value) => one(key, a.put(key, value, None)?),
        Step::PutWithContext(key, value) => {
            let ctx = a.causal_context(key)?.unwrap_or_default();
            one(key, a.put(key, value, Some(&ctx))?)
        }
        Step::Delete(key) => one(key, a.delete(key, None)?),
        Step::Counter(key, amount) => {
            a.counter_add(key, *amount)?;
            Vec::new()
        }
        Step::SetAdd(key, member) => one(key, a.set_add(key, member)?),
        Step::SetRemove(key, member) => one(key, a.set_remove(key, member)?),
        Step::Batch(ops) => {
            let mut batch = Batch::new();
            for op in ops {
                match op {
                    BatchOp::Put(k, v) => batch.put(k.clone(), v.clone()),
                    BatchOp::Delete(k) => batch.delete(k.clone(), None),
                    BatchOp::Counter(k, n) => batch.counter_add(k.clone(), *n),
                    BatchOp::SetAdd(k, m) => batch.set_add(k.clone(), m.clone()),
                    BatchOp::SetRemove(k, m) => batch.set_remove(k.clone(), m.clone()),
                };
            }
            let contexts = a.write(&batch)?;
            ops.iter()
                .map(batch_key)
                .zip(contexts)
                .map(|(k, c)| (k.to_vec(), c))
                .collect()
        }
        Step::Sync => {
            gossipkv::sync::sync(a, b)?;
            Vec::new()
        }
        Step::Purge => {
            let va = a.partition_versions()?;
            let vb = b.partition_versions()?;
            for p in 0..PARTITIONS {
                let stable = va[usize::from(p)].meet(&vb[usize::from(p)]);
                a.purge(p, &stable)?;
                b.purge(p, &stable)?;
            }
            Vec::new()
        }
        Step::Drop(p) => {
            a.drop_partition(*p)?;
            Vec::new()
        }
        Step::RefusedPut(key) => match a.put(key, b"refused", None) {
            Err(Error::OwnWritesMissing { .. }) => Vec::new(),
            Err(e) => return Err(e),
            Ok(_) => panic!("a write to a dropped partition was accepted"),
        },
    })
}

fn batch_key(op: &BatchOp) -> &[u8] {
    match op {
        BatchOp::Put(k, _)
        | BatchOp::Delete(k)
        | BatchOp::Counter(k, _)
        | BatchOp::SetAdd(k, _)
        | BatchOp::SetRemove(k, _) => k,
    }
}

// ---------------------------------------------------------------------------
// The model of acknowledged writes

#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Register(Vec<u8>),
    /// Deleted, or never there: reads find nothing.
    Nothing,
    Counter(i64),
    Set(BTreeSet<Vec<u8>>),
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// Keys not listed are not checked (not known to be anything yet).
    keys: BTreeMap<Vec<u8>, Expect>,
    /// What a dropped partition held, back once it is synced back.
    stashed: BTreeMap<Vec<u8>, Expect>,
    /// What the second replica holds of its own.
    replica: BTreeMap<Vec<u8>, Expect>,
    /// Per partition: the highest own sequence in a context handed out.
    max_own: BTreeMap<u16, u64>,
}

impl Model {
    fn new() -> Self {
        let mut model = Model::default();
        for p in 0..PARTITIONS {
            model.replica.insert(
                key_in(p, "b", 0),
                Expect::Register(format!("from b {p}").into_bytes()),
            );
            model.replica.insert(key_in(p, "b", 1), Expect::Counter(40));
        }
        model
    }

    fn counter(&mut self, key: &[u8], amount: i64) {
        let e = self.keys.entry(key.to_vec()).or_insert(Expect::Counter(0));
        match e {
            Expect::Counter(n) => *n += amount,
            other => *other = Expect::Counter(amount),
        }
    }

    fn set(&mut self, key: &[u8], member: &[u8], add: bool) {
        let e = self
            .keys
            .entry(key.to_vec())
            .or_insert(Expect::Set(BTreeSet::new()));
        if !matches!(e, Expect::Set(_)) {
            *e = Expect::Set(BTreeSet::new());
        }
        if let Expect::Set(members) = e {
            if add {
                members.insert(member.to_vec());
            } else {
                members.remove(member);
            }
        }
    }

    /// Records an acknowledged step.
    fn apply(&mut self, step: &Step, contexts: &Contexts) {
        match step {
            Step::Put(k, v) | Step::PutWithContext(k, v) => {
                self.keys.insert(k.clone(), Expect::Register(v.clone()));
            }
            Step::Delete(k) => {
                self.keys.insert(k.clone(), Expect::Nothing);
            }
            Step::Counter(k, n) => self.counter(k, *n),
            Step::SetAdd(k, m) => self.set(k, m, true),
            Step::SetRemove(k, m) => self.set(k, m, false),
            Step::Batch(ops) => {
                for op in ops {
                    match op {
                        BatchOp::Put(k, v) => {
                            self.keys.insert(k.clone(), Expect::Register(v.clone()));
                        }
                        BatchOp::Delete(k) => {
                            self.keys.insert(k.clone(), Expect::Nothing);
                        }
                        BatchOp::Counter(k, n) => self.counter(k, *n),
                        BatchOp::SetAdd(k, m) => self.set(k, m, true),
                        BatchOp::SetRemove(k, m) => self.set(k, m, false),
                    }
                }
            }
            Step::Sync => {
                let stashed = std::mem::take(&mut self.stashed);
                self.keys.extend(stashed);
                self.keys
                    .extend(self.replica.iter().map(|(k, e)| (k.clone(), e.clone())));
            }
            Step::Purge | Step::RefusedPut(_) => {}
            Step::Drop(p) => {
                for (k, e) in self.keys.iter_mut() {
                    if partition_of(k) == *p {
                        let was = std::mem::replace(e, Expect::Nothing);
                        self.stashed.insert(k.clone(), was);
                    }
                }
            }
        }
        for (key, ctx) in contexts {
            let own = self.max_own.entry(partition_of(key)).or_insert(0);
            *own = (*own).max(ctx.get(A));
        }
    }
}

fn found(store: &Store, key: &[u8], expect: &Expect) -> Result<bool, Error> {
    let record = store.get(key)?;
    Ok(match (expect, record.map(|r| r.value)) {
        (Expect::Nothing, None) => true,
        (Expect::Register(v), Some(Value::Register(values))) => values == vec![v.clone()],
        (Expect::Counter(n), Some(Value::Counter(m))) => *n == m,
        (Expect::Counter(0), None) => true,
        (Expect::Set(members), Some(Value::Set(got))) => {
            got.iter().cloned().collect::<BTreeSet<_>>() == *members
        }
        (Expect::Set(members), None) => members.is_empty(),
        _ => false,
    })
}

/// (b): every key matches what one of the models expects of it (two models
/// when the step in flight may or may not have landed).
fn check_model(store: &Store, models: &[&Model]) -> Result<(), String> {
    let keys: BTreeSet<&Vec<u8>> = models.iter().flat_map(|m| m.keys.keys()).collect();
    for key in keys {
        let mut ok = false;
        for model in models {
            match model.keys.get(key) {
                None => ok = true,
                Some(e) => ok |= found(store, key, e).map_err(|e| e.to_string())?,
            }
        }
        if !ok {
            let wanted: Vec<_> = models.iter().map(|m| m.keys.get(key)).collect();
            return Err(format!(
                "lost an acknowledged write: key {:?} reads {:?}, expected one of {wanted:?}",
                String::from_utf8_lossy(key),
                store.get(key).map(|r| r.map(|r| r.value)),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Snapshots of what a reader can see

#[derive(Clone, Debug, PartialEq)]
struct Snapshot {
    records: Vec<(Vec<u8>, Record)>,
    tombstones: Vec<(Vec<u8>, CausalContext)>,
    versions: Vec<VersionVector>,
}

fn snapshot(store: &Store) -> Result<Snapshot, Error> {
    let records = store.scan_prefix(b"")?.collect::<Result<Vec<_>, _>>()?;
    let mut tombstones = Vec::new();
    for key in key_universe() {
        if store.get(&key)?.is_none() {
            if let Some(ctx) = store.causal_context(&key)? {
                tombstones.push((key, ctx));
            }
        }
    }
    Ok(Snapshot {
        records,
        tombstones,
        versions: store.partition_versions()?,
    })
}

/// The first difference between two snapshots, for failure messages.
fn difference(now: &Snapshot, then: &Snapshot) -> String {
    let show = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
    let a: BTreeMap<_, _> = now.records.iter().map(|(k, r)| (show(k), r)).collect();
    let b: BTreeMap<_, _> = then.records.iter().map(|(k, r)| (show(k), r)).collect();
    for key in a.keys().chain(b.keys()) {
        if a.get(key) != b.get(key) {
            return format!("key {key}: {:?} vs {:?}", a.get(key), b.get(key));
        }
    }
    if now.tombstones != then.tombstones {
        return format!("tombstones {:?} vs {:?}", now.tombstones, then.tombstones);
    }
    format!("versions {:?} vs {:?}", now.versions, then.versions)
}

/// Keys a store holds in a partition: live ones and tombstones.
fn held_keys(store: &Store, partition: u16) -> Result<BTreeSet<Vec<u8>>, Error> {
    let mut keys = BTreeSet::new();
    for row in store.scan_prefix(b"")? {
        let (key, _) = row?;
        if partition_of(&key) == partition {
            keys.insert(key);
        }
    }
    for key in key_universe() {
        if partition_of(&key) == partition && store.causal_context(&key)?.is_some() {
            keys.insert(key);
        }
    }
    Ok(keys)
}

fn streamed_keys(store: &Store, partition: u16) -> Result<Vec<Vec<u8>>, Error> {
    let mut keys = Vec::new();
    for chunk in store.changes_since(partition, &VersionVector::new())? {
        keys.extend(chunk?.entries.into_iter().map(|e| e.key));
    }
    Ok(keys)
}

// ---------------------------------------------------------------------------
// Runs and checks

/// The workload on a healthy disk: its sync count and the state after each
/// step (index 0: the freshly opened store).
struct Reference {
    syncs: u64,
    snapshots: Vec<Snapshot>,
}

fn reference() -> Reference {
    let disk = PowerLossDisk::default();
    let b = Store::open_in_memory(options(B)).expect("replica opens");
    seed_replica(&b).expect("replica writes");
    let a = Store::open_with_backend(disk.clone(), options(A)).expect("store opens");
    let mut snapshots = vec![snapshot(&a).expect("snapshot")];
    for step in workload() {
        run_step(&a, &b, &step).unwrap_or_else(|e| panic!("{step:?} on a healthy disk: {e}"));
        snapshots.push(snapshot(&a).expect("snapshot"));
    }
    drop(a);
    Reference {
        syncs: disk.syncs(),
        snapshots,
    }
}

/// One run of the workload on `disk`, stopped at the first failed step.
struct Run {
    disk: PowerLossDisk,
    /// The second replica's image, closed cleanly after the run.
    replica: Vec<u8>,
    /// Acknowledged steps.
    acked: usize,
    /// The model after the acknowledged steps, and after the failed one.
    model: Model,
    model_if_landed: Option<Model>,
    failed_step: Option<Step>,
    /// Whether creating the store returned.
    created: bool,
}

fn run(disk: PowerLossDisk) -> Run {
    let replica_disk = PowerLossDisk::default();
    let b = Store::open_with_backend(replica_disk.clone(), options(B)).expect("replica opens");
    seed_replica(&b).expect("replica writes");
    let mut model = Model::new();
    let mut acked = 0;
    let mut model_if_landed = None;
    let mut failed_step = None;
    let mut created = false;
    // A failure while creating the store leaves nothing acknowledged.
    if let Ok(a) = Store::open_with_backend(disk.clone(), options(A)) {
        created = true;
        for step in workload() {
            match run_step(&a, &b, &step) {
                Ok(contexts) => {
                    model.apply(&step, &contexts);
                    acked += 1;
                }
                Err(_) => {
                    let mut landed = model.clone();
                    landed.apply(&step, &Vec::new());
                    model_if_landed = Some(landed);
                    failed_step = Some(step);
                    break;
                }
            }
        }
        assert!(
            failed_step.is_some() || !disk.failed(),
            "a step acknowledged its write although a sync failed under it"
        );
        if failed_step.is_some() {
            // Nothing may be acknowledged once the disk is gone.
            assert!(
                a.put(b"probe", b"after the failure", None).is_err(),
                "a write was acknowledged after a failed sync"
            );
        }
    }
    drop(b);
    let replica = replica_disk.crash_image(Survivors::All);
    Run {
        disk,
        replica,
        acked,
        model,
        model_if_landed,
        failed_step,
        created,
    }
}

/// Checks (a) to (e) on a store reopened from `image`.
fn check_image(run: &Run, reference: &Reference, image: Vec<u8>) -> Result<(), String> {
    let err = |what: &str| {
        let what = what.to_string();
        move |e: Error| format!("{what}: {e}")
    };
    // (a)
    let a = match Store::open_with_backend(PowerLossDisk::from_image(image), options(A)) {
        Ok(a) => a,
        // redb writes a new database's header in several synced steps; on a
        // bare backend a crash between them leaves an image redb refuses
        // ("not a redb database"). Nothing was acknowledged then, and the
        // error is typed. (`Store::open` creates files under a temporary
        // name and renames them into place, so a path never holds one.)
        Err(Error::Open { .. }) if !run.created => return Ok(()),
        Err(e) => return Err(format!("the store does not reopen: {e}")),
    };
    // (b)
    let mut models = vec![&run.model];
    models.extend(run.model_if_landed.as_ref());
    check_model(&a, &models)?;
    // (c): a failed local step landed whole or not at all.
    let now = snapshot(&a).map_err(err("snapshot"))?;
    let sync_in_flight = run
        .failed_step
        .as_ref()
        .is_some_and(Step::spans_transactions);
    if !sync_in_flight {
        let before = &reference.snapshots[run.acked];
        let after = reference.snapshots.get(run.acked + 1);
        if now != *before && Some(&now) != after {
            return Err(format!(
                "the store holds neither the state before the step in flight nor after it: {}",
                difference(&now, before)
            ));
        }
    }
    // (d): the change index names exactly the keys held.
    for p in 0..PARTITIONS {
        let streamed = streamed_keys(&a, p).map_err(err("changes_since"))?;
        let unique: BTreeSet<_> = streamed.iter().cloned().collect();
        if unique.len() != streamed.len() {
            return Err(format!("partition {p}: a key streamed twice: {streamed:?}"));
        }
        let held = held_keys(&a, p).map_err(err("read"))?;
        if unique != held {
            return Err(format!(
                "partition {p}: changes_since streams {unique:?} but the store holds {held:?}"
            ));
        }
    }
    // (d): new writes get dots above every own dot handed out.
    let fresh_write = |p: u16, i: usize| -> Result<(), String> {
        let key = key_in(p, "fresh", i);
        let ctx = a
            .put(&key, b"fresh", None)
            .map_err(err("a write after reopening"))?;
        let floor = run.model.max_own.get(&p).copied().unwrap_or(0);
        if ctx.get(A) <= floor {
            return Err(format!(
                "partition {p}: a new write got dot {} but dot {floor} was handed out before",
                ctx.get(A)
            ));
        }
        Ok(())
    };
    let mut unwritable = Vec::new();
    for p in 0..PARTITIONS {
        if a.writable(p) {
            fresh_write(p, 0)?;
        } else {
            match a.put(&key_in(p, "fresh", 0), b"fresh", None) {
                Err(Error::OwnWritesMissing { .. }) => unwritable.push(p),
                other => return Err(format!("partition {p}: unwritable, yet {other:?}")),
            }
        }
    }
    // (e): a sync with the other replica converges.
    let b = Store::open_with_backend(PowerLossDisk::from_image(run.replica.clone()), options(B))
        .map_err(err("the replica does not reopen"))?;
    gossipkv::sync::sync(&a, &b).map_err(err("sync after reopening"))?;
    let (sa, sb) = (
        snapshot(&a).map_err(err("snapshot"))?,
        snapshot(&b).map_err(err("snapshot"))?,
    );
    if (&sa.records, &sa.versions) != (&sb.records, &sb.versions) {
        return Err(format!(
            "the replicas differ after a sync: {}",
            difference(&sa, &sb)
        ));
    }
    for p in unwritable {
        if p != DROPPED {
            return Err(format!("partition {p} lost own writes"));
        }
        if !a.writable(p) {
            return Err(format!("partition {p} is not writable after a sync back"));
        }
        fresh_write(p, 1)?;
    }
    gossipkv::sync::sync(&a, &b).map_err(err("second sync"))?;
    Ok(())
}

fn check_every_crash_point(torn_seeds: u64) {
    let reference = reference();
    assert!(reference.syncs > 20, "only {} syncs", reference.syncs);
    let mut failures = Vec::new();
    let (mut images_checked, mut in_flight) = (0, BTreeMap::<String, u32>::new());
    // Sync `syncs + 1` never comes: the power goes after a clean close.
    for n in 1..=reference.syncs + 1 {
        let run = run(PowerLossDisk::failing_at(n));
        assert_eq!(
            run.disk.failed(),
            n <= reference.syncs,
            "the run with sync {n} failing"
        );
        let mut images = vec![Survivors::None, Survivors::All];
        images.extend((0..torn_seeds).map(|s| Survivors::Torn(n * 1000 + s)));
        let kind = match &run.failed_step {
            Some(step) => format!("{step:?}")
                .split(['(', ' '])
                .next()
                .unwrap_or("")
                .to_string(),
            None if !run.created => "creating".to_string(),
            None => "closing".to_string(),
        };
        *in_flight.entry(kind).or_default() += 1;
        for survivors in images {
            images_checked += 1;
            let image = run.disk.crash_image(survivors);
            if let Err(e) = check_image(&run, &reference, image) {
                failures.push(format!(
                    "crash at sync {n} ({survivors:?}, {} steps acknowledged, in flight {:?}): {e}",
                    run.acked, run.failed_step
                ));
            }
        }
    }
    eprintln!(
        "{} syncs, {images_checked} crash images checked; crash points by step in flight: {in_flight:?}",
        reference.syncs
    );
    assert!(
        failures.is_empty(),
        "{} of the crash images fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_crash_point_of_the_workload_reopens_with_every_acknowledged_write() {
    check_every_crash_point(2);
}

#[test]
#[ignore = "heavier: many torn images per crash point"]
fn every_crash_point_survives_many_torn_page_caches() {
    check_every_crash_point(24);
}

#[test]
fn the_checker_catches_a_disk_that_acknowledges_syncs_it_did_not_make() {
    let reference = reference();
    let run = run(PowerLossDisk::lying());
    assert!(run.failed_step.is_none(), "a lying disk fails nothing");
    for survivors in [Survivors::None, Survivors::Torn(7)] {
        let image = run.disk.crash_image(survivors);
        let result = check_image(&run, &reference, image);
        eprintln!("lying disk, {survivors:?}: {result:?}");
        assert!(
            result.is_err(),
            "the checker passed a store that lost acknowledged writes ({survivors:?})"
        );
    }
}

#[test]
fn a_new_store_file_is_created_whole_under_a_temporary_name(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("store.redb");
    {
        let store = Store::open(&path, options(A))?;
        store.put(b"k", b"v", None)?;
        let files: Vec<_> = std::fs::read_dir(dir.path())?
            .map(|f| f.map(|f| f.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(files, vec![std::ffi::OsString::from("store.redb")]);
    }
    let store = Store::open(&path, options(A))?;
    assert_eq!(
        store.get(b"k")?.map(|r| r.value),
        Some(Value::Register(vec![b"v".to_vec()]))
    );
    Ok(())
}

/// With `Durability::Buffered` a crash loses the latest commits. If a sync
/// had already shipped them, the reopened store would issue their sequence
/// numbers again for other writes, and sync, seeing those dots covered on
/// both sides, would skip the entries both ways and leave the replicas
/// different while reporting success. So a buffered store flushes its
/// commits before entries leave it (`changes_since`, `entry_bytes`).
#[test]
fn a_buffered_store_that_loses_replicated_commits_does_not_reuse_their_dots() {
    let disk = PowerLossDisk::default();
    let b = Store::open_in_memory(options(B)).expect("replica opens");
    let key = |i| key_in(0, "k", i);
    {
        let a = Store::open_with_backend(disk.clone(), options(A).durability(Durability::Buffered))
            .expect("store opens");
        a.put(&key(0), b"shipped, then lost", None).expect("put");
        gossipkv::sync::sync(&a, &b).expect("sync");
        // Power loss before anything of it reached the disk.
        let image = disk.crash_image(Survivors::None);
        drop(a);
        let a = Store::open_with_backend(
            PowerLossDisk::from_image(image),
            options(A).durability(Durability::Buffered),
        )
        .expect("store reopens");
        a.put(&key(1), b"written after the crash", None)
            .expect("put");
        let synced = gossipkv::sync::sync(&a, &b);
        if synced.is_ok() {
            let (sa, sb) = (
                snapshot(&a).expect("snapshot"),
                snapshot(&b).expect("snapshot"),
            );
            assert_eq!(
                sa.records,
                sb.records,
                "sync reported success but the replicas differ: {}",
                difference(&sa, &sb)
            );
        }
    }
}

/// The local writes of an exposed group, applied and sent to `b` before
/// `a`'s commit is durable (as a node replicates while its disk flushes).
/// Returns what the commit said.
fn exposed_group_sent_to(
    a: &Store,
    b: &Store,
    writes: &[GroupWrite],
) -> Result<Vec<Result<GroupOutcome, Error>>, Error> {
    a.commit_group_exposed(writes, |outcomes| {
        let merges: Vec<GroupWrite> = writes
            .iter()
            .zip(outcomes)
            .filter_map(|(write, outcome)| match (write, outcome) {
                (
                    GroupWrite::Local(op),
                    Ok(GroupOutcome::Local {
                        entry: Some(entry), ..
                    }),
                ) => Some(GroupWrite::Merge {
                    partition: partition_of(op.key()),
                    key: op.key().to_vec(),
                    entry: entry.clone(),
                }),
                _ => None,
            })
            .collect();
        for merged in b.commit_group(&merges).expect("the replica commits") {
            merged.expect("the replica takes the entry");
        }
    })
}

fn exposed_writes(tag: &str) -> Vec<GroupWrite> {
    vec![
        GroupWrite::Local(Op::Put {
            key: key_in(0, "reg", 0),
            value: format!("{tag} value").into_bytes(),
            context: None,
        }),
        GroupWrite::Local(Op::CounterAdd {
            key: key_in(0, "count", 0),
            amount: 10,
        }),
        GroupWrite::Local(Op::SetAdd {
            key: key_in(0, "set", 0),
            member: format!("{tag} member").into_bytes(),
        }),
    ]
}

/// A node sends a group's entries to another replica while its commit
/// flushes, then loses power before the flush lands. The replica holds
/// writes the restarted store does not, under dots that store's vector
/// does not cover: were they issued again for other writes, sync would
/// see them covered on both sides and never reconcile (or refuse them as
/// unissued). The store recorded that it exposes writes before the group,
/// so the reopened store writes as a new writer, takes the lost writes
/// back from the replica like any other node's, and both converge with
/// every write of both runs.
#[test]
fn writes_sent_before_a_flush_the_crash_lost_are_never_issued_again() {
    let disk = PowerLossDisk::default();
    let b = Store::open_in_memory(options(B)).expect("replica opens");
    let a = Store::open_with_backend(disk.clone(), options(A)).expect("store opens");
    a.counter_add(&key_in(0, "count", 0), 1)
        .expect("a durable add");
    gossipkv::sync::sync(&a, &b).expect("sync");
    assert_eq!(a.writer_id(), A, "a fresh store writes under its node id");
    // The exposure record, then the group's commit, whose sync fails: the
    // disk is gone, with the group's entries already on the replica.
    disk.state().fail_at = Some(disk.syncs() + 2);
    let lost = exposed_group_sent_to(&a, &b, &exposed_writes("first"));
    assert!(lost.is_err(), "the group's flush failed: {lost:?}");
    let image = disk.crash_image(Survivors::None);
    drop(a);

    let a = Store::open_with_backend(PowerLossDisk::from_image(image), options(A))
        .expect("store reopens");
    assert_ne!(
        a.writer_id(),
        A,
        "the reopened store writes as a new writer"
    );
    assert_eq!(a.node_id(), A, "under the same node");
    assert!(a.get(&key_in(0, "reg", 0)).expect("get").is_none());
    // New writes, on the same keys and others: none reuses a lost dot.
    for written in a
        .commit_group_exposed(&exposed_writes("second"), |_| ())
        .expect("the new writer commits")
    {
        written.expect("each write lands");
    }
    a.put(&key_in(1, "after", 0), b"after the crash", None)
        .expect("put");
    gossipkv::sync::sync(&a, &b).expect("the replicas reconcile");
    let (sa, sb) = (
        snapshot(&a).expect("snapshot"),
        snapshot(&b).expect("snapshot"),
    );
    assert_eq!(sa.records, sb.records, "{}", difference(&sa, &sb));
    // Every write of both runs is there: the lost group's came back.
    assert_eq!(a.counter(&key_in(0, "count", 0)).expect("counter"), 21);
    let members = a.set_members(&key_in(0, "set", 0)).expect("members");
    assert_eq!(
        members,
        vec![b"first member".to_vec(), b"second member".to_vec()]
    );
    match a.get(&key_in(0, "reg", 0)).expect("get").map(|r| r.value) {
        Some(Value::Register(mut values)) => {
            values.sort();
            assert_eq!(
                values,
                vec![b"first value".to_vec(), b"second value".to_vec()],
                "the two writes never saw each other: both stay"
            );
        }
        other => panic!("register: {other:?}"),
    }
}

/// The new writer is only for stores that may have lost exposed writes:
/// a store closed cleanly keeps its writer, and one that never exposed a
/// write keeps it whatever happened to the process.
#[test]
fn a_clean_close_or_no_exposure_keeps_the_writer() {
    let disk = PowerLossDisk::default();
    {
        let a = Store::open_with_backend(disk.clone(), options(A)).expect("store opens");
        a.commit_group_exposed(&exposed_writes("clean"), |_| ())
            .expect("commit");
        a.close().expect("close");
    }
    let a = Store::open_with_backend(
        PowerLossDisk::from_image(disk.crash_image(Survivors::None)),
        options(A),
    )
    .expect("reopens");
    assert_eq!(a.writer_id(), A, "a clean close keeps the writer");
    let disk = PowerLossDisk::default();
    let a = Store::open_with_backend(disk.clone(), options(A)).expect("store opens");
    a.put(b"plain", b"durable put", None).expect("put");
    let image = disk.crash_image(Survivors::None);
    drop(a);
    let disk = PowerLossDisk::from_image(image);
    let a = Store::open_with_backend(disk.clone(), options(A)).expect("reopens");
    assert_eq!(a.writer_id(), A, "nothing was exposed: same writer");
    // Exposed, then killed: a new writer each time.
    a.commit_group_exposed(&exposed_writes("x"), |_| ())
        .expect("commit");
    let image = disk.crash_image(Survivors::None);
    drop(a);
    let disk = PowerLossDisk::from_image(image);
    let a = Store::open_with_backend(disk.clone(), options(A)).expect("reopens");
    let first = a.writer_id();
    assert_ne!(first, A, "killed after exposing: a new writer");
    a.commit_group_exposed(&exposed_writes("y"), |_| ())
        .expect("commit");
    let image = disk.crash_image(Survivors::None);
    drop(a);
    let a =
        Store::open_with_backend(PowerLossDisk::from_image(image), options(A)).expect("reopens");
    assert!(
        a.writer_id() != first && a.writer_id() != A,
        "each unclean close takes a writer never used before"
    );
}
