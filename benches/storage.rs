//! Storage benchmarks: each gossipkv figure beside raw redb doing the same
//! work on the same bytes in the same run, printed as
//! `metric: <name> <value> <unit>` lines.
//!
//! `cargo bench --bench storage` runs the full sizes; `-- --quick` runs a
//! tenth of them for a smoke test. Progress goes to stderr.

use gossipkv::store::{wal_path, Durability, GroupWrite, Op};
use gossipkv::{Batch, NodeId, Store, StoreOptions, VersionVector};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redb::{Database, ReadableDatabase, TableDefinition};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const RAW: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raw");
const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;
const BATCH: usize = 1_000;

struct Sizes {
    batched_writes: usize,
    reads: usize,
    durable_writes: usize,
    grouped_writes: usize,
    small_store: usize,
    large_store: usize,
    changed: usize,
}

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn progress(what: &str, done: usize, total: usize) {
    if done == total || done.is_multiple_of((total / 10).max(1)) {
        eprint!("\r{what}: {:>3}%", done * 100 / total.max(1));
        if done == total {
            eprintln!();
        }
        let _ = std::io::stderr().flush();
    }
}

fn keys(n: usize, seed: u64) -> Vec<[u8; KEY_BYTES]> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random()).collect()
}

fn value(i: usize) -> Vec<u8> {
    let mut v = vec![b'v'; VALUE_BYTES];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v
}

fn open_store(dir: &Path, name: &str, durability: Durability) -> Store {
    let options = StoreOptions::default()
        .node_id(NodeId(1))
        .durability(durability);
    Store::open(dir.join(name), options).expect("open store")
}

fn open_redb(dir: &Path, name: &str) -> Database {
    Database::create(dir.join(name)).expect("create redb")
}

fn store_put_batched(store: &Store, keys: &[[u8; KEY_BYTES]], what: &str) -> Duration {
    let start = Instant::now();
    for (i, chunk) in keys.chunks(BATCH).enumerate() {
        let mut batch = Batch::new();
        for (j, key) in chunk.iter().enumerate() {
            batch.put(key.to_vec(), value(i * BATCH + j));
        }
        store.write(&batch).expect("write batch");
        progress(what, (i + 1) * BATCH.min(chunk.len()), keys.len());
    }
    start.elapsed()
}

fn redb_put_batched(
    db: &Database,
    keys: &[[u8; KEY_BYTES]],
    durability: redb::Durability,
) -> Duration {
    let start = Instant::now();
    for (i, chunk) in keys.chunks(BATCH).enumerate() {
        let mut txn = db.begin_write().expect("begin");
        txn.set_durability(durability).expect("durability");
        {
            let mut table = txn.open_table(RAW).expect("table");
            for (j, key) in chunk.iter().enumerate() {
                table
                    .insert(key.as_slice(), value(i * BATCH + j).as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    start.elapsed()
}

fn ops_per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn bench_put_and_get(dir: &Path, sizes: &Sizes) {
    let keys = keys(sizes.batched_writes, 1);

    let db = open_redb(dir, "raw-batched.redb");
    let raw = redb_put_batched(&db, &keys, redb::Durability::Immediate);
    let store = open_store(dir, "store-batched.redb", Durability::Immediate);
    let ours = store_put_batched(&store, &keys, "put_batched");
    let (ours, raw) = (ops_per_sec(keys.len(), ours), ops_per_sec(keys.len(), raw));
    metric("put_batched_ops", ours, "ops/s");
    metric("redb_put_batched_ops", raw, "ops/s");
    metric("put_batched_ratio_vs_redb", ours / raw, "ratio");

    // Random point reads of existing keys, one read transaction each. Both
    // sides copy the value out: black_box keeps the compiler from dropping
    // the raw side's copy, whose bytes are never read. The two sides take
    // turns on blocks of the same keys, the first alternating, so that a
    // change in the machine's load falls on both alike.
    let mut rng = StdRng::seed_from_u64(2);
    let order: Vec<usize> = (0..sizes.reads)
        .map(|_| rng.random_range(0..keys.len()))
        .collect();
    let mut bytes = 0usize;
    let mut raw_get = |block: &[usize]| {
        let start = Instant::now();
        for &i in block {
            let txn = db.begin_read().expect("read");
            let table = txn.open_table(RAW).expect("table");
            let v = table
                .get(keys[i].as_slice())
                .expect("get")
                .expect("present");
            bytes += std::hint::black_box(v.value().to_vec()).len();
        }
        start.elapsed()
    };
    let mut store_bytes = 0usize;
    let mut store_get = |block: &[usize]| {
        let start = Instant::now();
        for &i in block {
            let record = store.get(&keys[i]).expect("get").expect("present");
            if let gossipkv::Value::Register(values) = record.value {
                store_bytes += values[0].len();
            }
        }
        start.elapsed()
    };
    let (mut raw, mut ours) = (Duration::ZERO, Duration::ZERO);
    for (n, block) in order.chunks(1_000).enumerate() {
        if n % 2 == 0 {
            raw += raw_get(block);
            ours += store_get(block);
        } else {
            ours += store_get(block);
            raw += raw_get(block);
        }
    }
    bytes += store_bytes;
    assert_eq!(bytes, 2 * sizes.reads * VALUE_BYTES);
    let (ours, raw) = (
        ops_per_sec(order.len(), ours),
        ops_per_sec(order.len(), raw),
    );
    metric("get_ops", ours, "ops/s");
    metric("redb_get_ops", raw, "ops/s");
    metric("get_ratio_vs_redb", ours / raw, "ratio");
    drop(store);
    bench_open(dir, "store-batched.redb", keys.len());
}

/// Reopening a store of `entries` with the page-checksum pass on (the
/// default) beside the same open without it.
fn bench_open(dir: &Path, name: &str, entries: usize) {
    let time_open = |verify: bool| {
        let options = StoreOptions::default()
            .node_id(NodeId(1))
            .verify_on_open(verify);
        let start = Instant::now();
        let store = Store::open(dir.join(name), options).expect("reopen store");
        let elapsed = start.elapsed();
        drop(store);
        elapsed
    };
    // One untimed open first so both timed opens find the file in the page
    // cache.
    time_open(false);
    let plain = time_open(false);
    let verified = time_open(true);
    let bytes = std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    metric("open_entries", entries as f64, "entries");
    metric("open_file_bytes", bytes as f64, "bytes");
    metric("open_verified_ms", verified.as_secs_f64() * 1e3, "ms");
    metric("open_unverified_ms", plain.as_secs_f64() * 1e3, "ms");
    metric(
        "open_verified_ratio_vs_unverified",
        verified.as_secs_f64() / plain.as_secs_f64(),
        "ratio",
    );
}

fn bench_put_durable(dir: &Path, sizes: &Sizes) {
    let keys = keys(sizes.durable_writes, 3);
    let db = open_redb(dir, "raw-durable.redb");
    let start = Instant::now();
    for (i, key) in keys.iter().enumerate() {
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(RAW).expect("table");
            table
                .insert(key.as_slice(), value(i).as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let raw = start.elapsed();
    let store = open_store(dir, "store-durable.redb", Durability::Immediate);
    let start = Instant::now();
    for (i, key) in keys.iter().enumerate() {
        store.put(key, &value(i), None).expect("put");
        progress("put_durable", i + 1, keys.len());
    }
    let ours = start.elapsed();
    let (ours, raw) = (ops_per_sec(keys.len(), ours), ops_per_sec(keys.len(), raw));
    metric("put_durable_ops", ours, "ops/s");
    metric("redb_put_durable_ops", raw, "ops/s");
    metric("put_durable_ratio_vs_redb", ours / raw, "ratio");
}

/// Median time to list the `changed` entries written after a snapshot of
/// every partition's version vector, in a store of `size` entries.
fn time_changes_since(dir: &Path, size: usize, changed: usize) -> Duration {
    let name = format!("store-{size}.redb");
    let store = open_store(dir, &name, Durability::Buffered);
    let keys = keys(size, 4);
    store_put_batched(&store, &keys, &format!("building {size}-entry store"));
    let before: Vec<VersionVector> = (0..store.partitions())
        .map(|p| store.partition_version(p).expect("version"))
        .collect();
    // Overwrite `changed` distinct existing keys.
    let mut batch = Batch::new();
    for (i, key) in keys
        .iter()
        .step_by(size / changed)
        .take(changed)
        .enumerate()
    {
        batch.put(key.to_vec(), value(size + i));
    }
    store.write(&batch).expect("changes");

    let mut samples = Vec::new();
    for _ in 0..15 {
        let start = Instant::now();
        let mut listed = 0;
        for (p, since) in before.iter().enumerate() {
            for chunk in store.changes_since(p as u16, since).expect("stream") {
                listed += chunk.expect("chunk").entries.len();
            }
        }
        samples.push(start.elapsed());
        assert_eq!(
            listed, changed,
            "changes_since listed the wrong number of entries"
        );
    }
    samples.sort();
    samples[samples.len() / 2]
}

fn bench_changes_since(dir: &Path, sizes: &Sizes) {
    let small = time_changes_since(dir, sizes.small_store, sizes.changed);
    let large = time_changes_since(dir, sizes.large_store, sizes.changed);
    metric(
        "changes_since_small_store_ms",
        small.as_secs_f64() * 1e3,
        "ms",
    );
    metric(
        "changes_since_large_store_ms",
        large.as_secs_f64() * 1e3,
        "ms",
    );
    metric(
        "changes_since_scaling",
        large.as_secs_f64() / small.as_secs_f64(),
        "ratio",
    );
}

/// Durable groups of the size a node commits under load (the cluster
/// bench's W=2 C=64 phase counts 0.045 fdatasyncs per client write over
/// three nodes: about 66 writes per flush on each), through the storage thread's call, beside raw redb
/// inserting the same keys in groups of the same size. The store's extra
/// cost is its change index and version vectors: more dirty pages per
/// group, each written with its own `pwrite`. Then the same groups made
/// durable through the write-ahead log, as a node commits them
/// (`put_grouped60_wal_ratio_vs_flushed`), and how fast a crash's log of
/// those writes replays at open (`wal_replay_entries_per_sec`).
fn bench_put_grouped(dir: &Path, sizes: &Sizes) {
    const GROUP: usize = 60;
    let keys = keys(sizes.grouped_writes, 4);
    let db = open_redb(dir, "raw-grouped.redb");
    let start = Instant::now();
    for (i, chunk) in keys.chunks(GROUP).enumerate() {
        let txn = db.begin_write().expect("begin");
        {
            let mut table = txn.open_table(RAW).expect("table");
            for (j, key) in chunk.iter().enumerate() {
                table
                    .insert(key.as_slice(), value(i * GROUP + j).as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    let raw = start.elapsed();
    let store = open_store(dir, "store-grouped.redb", Durability::Immediate);
    let start = Instant::now();
    put_groups(&store, &keys, GROUP, "put_grouped");
    let ours = start.elapsed();
    // The same groups durable through the write-ahead log (what a node
    // does), the final checkpoint (the close) included in the time.
    let logged = Store::open(
        dir.join("store-grouped-wal.redb"),
        StoreOptions::default().write_ahead_log(true),
    )
    .expect("open store");
    let start = Instant::now();
    put_groups(&logged, &keys, GROUP, "put_grouped_wal");
    logged.close().expect("close");
    let with_log = ops_per_sec(keys.len(), start.elapsed());
    // How fast a crash's log replays at open: the same writes, never
    // checkpointed, the files copied while the store is open.
    let crashed = dir.join("store-crashed.redb");
    {
        let path = dir.join("store-replayed.redb");
        let store = Store::open(
            &path,
            StoreOptions::default()
                .write_ahead_log(true)
                .checkpoint_interval(Duration::from_secs(3600)),
        )
        .expect("open store");
        put_groups(&store, &keys, GROUP, "wal_replay");
        std::fs::copy(&path, &crashed).expect("copy store");
        std::fs::copy(wal_path(&path), wal_path(&crashed)).expect("copy log");
    }
    let start = Instant::now();
    let reopened = Store::open(&crashed, StoreOptions::default().write_ahead_log(true))
        .expect("reopen after the crash");
    let replay = start.elapsed();
    assert!(reopened.get(&keys[keys.len() - 1]).expect("get").is_some());
    let (ours, raw) = (ops_per_sec(keys.len(), ours), ops_per_sec(keys.len(), raw));
    metric("put_grouped60_ops", ours, "ops/s");
    metric("redb_put_grouped60_ops", raw, "ops/s");
    metric("put_grouped60_ratio_vs_redb", ours / raw, "ratio");
    metric("put_grouped60_wal_ops", with_log, "ops/s");
    metric(
        "put_grouped60_wal_ratio_vs_flushed",
        with_log / ours,
        "ratio",
    );
    metric(
        "wal_replay_entries_per_sec",
        keys.len() as f64 / replay.as_secs_f64(),
        "entries/s",
    );
}

/// Puts `keys` into `store` in groups of `group`, as a node's storage
/// thread commits them.
fn put_groups(store: &Store, keys: &[[u8; KEY_BYTES]], group: usize, what: &str) {
    for (i, chunk) in keys.chunks(group).enumerate() {
        let writes: Vec<GroupWrite> = chunk
            .iter()
            .enumerate()
            .map(|(j, key)| {
                GroupWrite::Local(Op::Put {
                    key: key.to_vec(),
                    value: value(i * group + j),
                    context: None,
                })
            })
            .collect();
        store
            .commit_group_exposed(&writes, |_| {})
            .expect("commit group");
        progress(what, (i + 1) * group, keys.len());
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let sizes = Sizes {
        batched_writes: 200_000 / scale,
        reads: 200_000 / scale,
        durable_writes: 2_000 / scale,
        grouped_writes: 60_000 / scale,
        small_store: 10_000,
        large_store: 1_000_000 / scale,
        changed: 1_000,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    eprintln!(
        "storage benchmark in {} ({})",
        dir.path().display(),
        if quick { "quick" } else { "full" }
    );
    // `--only NAME` runs one phase (for profiling it alone).
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("put_and_get") {
        bench_put_and_get(dir.path(), &sizes);
    }
    if run("put_durable") {
        bench_put_durable(dir.path(), &sizes);
    }
    if run("put_grouped") {
        bench_put_grouped(dir.path(), &sizes);
    }
    if run("changes_since") {
        bench_changes_since(dir.path(), &sizes);
    }
}
