//! Change feed cost: a page for a prefix from a cursor, in a small and in a
//! large store that both took many changes outside the prefix since the
//! cursor, beside the baseline of walking the whole change log and
//! filtering it (what a log-position feed with a filter does), and the
//! write cost of the prefix index. Printed as `metric: <name> <value>
//! <unit>` lines; `-- --quick` runs a tenth of the sizes.

use gossipkv::store::{ChunkLimits, Durability};
use gossipkv::{Batch, NodeId, Store, StoreOptions, VersionVector};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

const PARTITIONS: u16 = 64;
const VALUE: &[u8] = &[b'v'; 100];

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn open(dir: &Path, name: &str) -> Store {
    let options = StoreOptions::default()
        .node_id(NodeId(1))
        .partitions(PARTITIONS)
        .durability(Durability::Buffered);
    Store::open(dir.join(name), options).expect("open store")
}

fn load(store: &Store, keys: impl Iterator<Item = String>, total: usize, what: &str) -> Duration {
    let started = Instant::now();
    let mut batch = Batch::new();
    for (i, key) in keys.enumerate() {
        batch.put(key.into_bytes(), VALUE.to_vec());
        if batch.len() == 1000 {
            store.write(&batch).expect("write");
            batch = Batch::new();
        }
        if (i + 1) % (total / 10).max(1) == 0 {
            eprint!("\r{what}: {:>3}%", (i + 1) * 100 / total);
            let _ = std::io::stderr().flush();
        }
    }
    if !batch.is_empty() {
        store.write(&batch).expect("write");
    }
    eprintln!();
    started.elapsed()
}

fn frontier(store: &Store) -> Vec<VersionVector> {
    store.partition_versions().expect("versions")
}

/// Reads the whole feed of `prefix` from `since`, every partition, in pages
/// of 1,000: the entries sent and the time taken (best of 5).
fn follow(store: &Store, prefix: &[u8], since: &[VersionVector]) -> (usize, Duration) {
    let mut best = Duration::MAX;
    let mut sent = 0;
    for _ in 0..5 {
        let started = Instant::now();
        sent = 0;
        for (p, since) in since.iter().enumerate() {
            let mut since = since.clone();
            loop {
                let limits = ChunkLimits {
                    max_entries: 1000,
                    max_bytes: 4 << 20,
                };
                let page = store
                    .feed_page(p as u16, prefix, &since, limits)
                    .expect("feed");
                sent += page.entries.len();
                since = page.frontier;
                if page.complete {
                    break;
                }
            }
        }
        best = best.min(started.elapsed());
    }
    (sent, best)
}

/// A store of `background` keys (under `other/` and other users), a cursor,
/// then `background` more changes outside `user/42/` and `changed` inside:
/// the time to read the feed of `user/42/` from the cursor, and of the
/// whole store filtered to it.
fn scenario(dir: &Path, background: usize, changed: usize) -> (Duration, Duration) {
    let store = open(dir, &format!("feed-{background}"));
    let keys = (0..background).map(|i| format!("user/{}/{i}", i % 1000 + 100));
    load(&store, keys, background, &format!("{background} keys"));
    let cursor = frontier(&store);
    let more = (0..background).map(|i| format!("other/{i}"));
    load(&store, more, background, "changes outside the prefix");
    let inside = (0..changed).map(|i| format!("user/42/{i}"));
    load(&store, inside, changed, "changes inside");
    let (sent, prefix_time) = follow(&store, b"user/42/", &cursor);
    assert_eq!(
        sent, changed,
        "the feed sends exactly the changes under the prefix"
    );
    // Baseline: the whole log since the cursor, filtered by the reader.
    let (all, log_time) = follow(&store, b"", &cursor);
    assert_eq!(all, background + changed);
    (prefix_time, log_time)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let dir = tempfile::tempdir().expect("temp dir");
    let changed = 100;
    let small = 10_000 / scale;
    let large = 200_000 / scale;
    let (small_prefix, _) = scenario(dir.path(), small, changed);
    let (large_prefix, large_log) = scenario(dir.path(), large, changed);
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    metric(
        &format!("feed_prefix_{changed}_changes_in_{small}_keys_us"),
        us(small_prefix),
        "us",
    );
    metric(
        &format!("feed_prefix_{changed}_changes_in_{large}_keys_us"),
        us(large_prefix),
        "us",
    );
    metric(
        &format!("feed_filtered_log_{large}_keys_us"),
        us(large_log),
        "us",
    );
    metric(
        "feed_cost_ratio_large_vs_small_store",
        us(large_prefix) / us(small_prefix),
        "ratio",
    );
    metric(
        "feed_prefix_vs_filtered_log_ratio",
        us(large_prefix) / us(large_log),
        "ratio",
    );

    // Write cost of the prefix index: keys four levels deep (four index
    // rows each) beside the same keys with `-` for `/` (none): same
    // lengths, order, count and values.
    let n = 100_000 / scale;
    let flat = open(dir.path(), "flat");
    let flat_time = load(
        &flat,
        (0..n).map(|i| format!("a-b{}-c{}-d{}-{i:08}", i % 7, i % 11, i % 13)),
        n,
        "flat keys",
    );
    let deep = open(dir.path(), "deep");
    let deep_time = load(
        &deep,
        (0..n).map(|i| format!("a/b{}/c{}/d{}/{i:08}", i % 7, i % 11, i % 13)),
        n,
        "keys 4 levels deep",
    );
    metric(
        "write_flat_keys_per_s",
        n as f64 / flat_time.as_secs_f64(),
        "ops/s",
    );
    metric(
        "write_deep_keys_per_s",
        n as f64 / deep_time.as_secs_f64(),
        "ops/s",
    );
    metric(
        "prefix_index_write_cost_ratio",
        deep_time.as_secs_f64() / flat_time.as_secs_f64(),
        "ratio",
    );
}
