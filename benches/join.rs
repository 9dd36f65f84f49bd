//! A node joins a loaded 3-node loopback cluster (real `gossipkv serve`
//! processes) while 8 clients keep reading and writing: client p99 before
//! the join and during it, with the sources' migration budget set
//! (`kvctl migrations --budget`) and, on a second cluster in the same
//! run, unlimited. Prints `metric:` lines: p99 before and during, their
//! ratio, the join's duration, and the migration bytes per second each
//! source sent (from its metrics) against its budget.
//!
//! Bounded: the load is 100,000 keys, each phase at most 60 s, every client
//! loop stops with its phase. `-- --quick` loads a tenth.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{scrape, Cluster};
use gossipkv::client::{Client, Request, Response};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE: [u8; 100] = [b'v'; 100];
const CLIENTS: usize = 8;
/// Bytes per second each node may send migration data at, in the budgeted
/// run.
const BUDGET: u64 = 256 << 10;

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn p99(mut latencies: Vec<Duration>) -> f64 {
    latencies.sort();
    let i = ((latencies.len() as f64 - 1.0) * 0.99).round() as usize;
    latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Clients reading and writing the loaded keys until `stop`; returns the
/// latencies of each.
fn steady_load(
    clients: &Arc<Vec<Client>>,
    keys: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<Duration>> {
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..CLIENTS {
        let (clients, stop) = (clients.clone(), stop.clone());
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
            let client = &clients[t % clients.len()];
            let mut latencies = Vec::new();
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let key = format!("k{:08}", rng.random_range(0..keys));
                let begun = Instant::now();
                let ok = if rng.random_bool(0.5) {
                    client.get(key.as_bytes()).await.is_ok()
                } else {
                    client.put(key.as_bytes(), &VALUE, None).await.is_ok()
                };
                if ok {
                    latencies.push(begun.elapsed());
                }
            }
            latencies
        });
    }
    tasks
}

async fn collect(mut tasks: tokio::task::JoinSet<Vec<Duration>>) -> Vec<Duration> {
    let mut all = Vec::new();
    while let Some(l) = tasks.join_next().await {
        all.extend(l.expect("client task"));
    }
    all
}

fn migration_bytes_sent(cluster: &Cluster, nodes: usize) -> f64 {
    (0..nodes)
        .map(|i| {
            scrape(cluster.metrics[i])
                .lines()
                .find(|l| l.starts_with("gossipkv_migration_bytes_sent_total"))
                .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum()
}

/// One run: load, measure, join a fourth node with `budget`, measure.
async fn run(name: &str, budget: Option<u64>, keys: usize) {
    eprintln!("{name}: starting 3 nodes, loading {keys} keys");
    let (mut cluster, status) = common::started(3).await;
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(common::client(cluster.addr(i), &tls).await);
    }
    let clients = Arc::new(clients);
    // Load with 32 writers.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut loaders = tokio::task::JoinSet::new();
    for t in 0..32 {
        let (clients, next) = (clients.clone(), next.clone());
        loaders.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return;
                }
                let key = format!("k{i:08}");
                let _ = clients[t % 3].put(key.as_bytes(), &VALUE, None).await;
            }
        });
    }
    while loaders.join_next().await.is_some() {}
    drop(status);

    let stop = Arc::new(AtomicBool::new(false));
    let before = steady_load(&clients, keys, &stop);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let p99_before = p99(collect(before).await);

    let admin_tls = cluster.admin_tls();
    for i in 0..3 {
        let admin = Client::connect_admin(cluster.addr(i), Some(&admin_tls))
            .await
            .expect("admin");
        let bytes_per_sec = budget.unwrap_or(0);
        let answer = admin
            .request(&Request::SetMigrationBudget { bytes_per_sec })
            .await;
        assert!(matches!(answer, Ok(Response::Done)), "{answer:?}");
    }
    let sent_before = migration_bytes_sent(&cluster, 3);
    let stop = Arc::new(AtomicBool::new(false));
    let during = steady_load(&clients, keys, &stop);
    let started = Instant::now();
    cluster.add_node();
    let newcomer = common::client(cluster.addr(3), &tls).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let done = newcomer.status().await.is_ok_and(|s| {
            s.members_alive == 4 && s.layout_version > 1 && s.layout_version == s.layout_completed
        });
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let join_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let p99_during = p99(collect(during).await);
    let sent = migration_bytes_sent(&cluster, 3) - sent_before;
    metric(&format!("{name}_p99_before_ms"), p99_before, "ms");
    metric(&format!("{name}_p99_during_ms"), p99_during, "ms");
    metric(
        &format!("{name}_p99_ratio"),
        p99_during / p99_before.max(1e-6),
        "ratio",
    );
    metric(&format!("{name}_seconds"), join_secs, "s");
    metric(&format!("{name}_migration_bytes"), sent, "bytes");
    let per_source = sent / join_secs.max(1e-3) / 3.0;
    metric(
        &format!("{name}_bytes_per_sec_per_source"),
        per_source,
        "bytes/s",
    );
    if let Some(b) = budget {
        metric(
            &format!("{name}_rate_over_budget"),
            per_source / b as f64,
            "ratio",
        );
    }
    drop(cluster);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let keys = if quick { 10_000 } else { 100_000 };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        run("join_budget", Some(BUDGET), keys).await;
        run("join_unlimited", None, keys).await;
    });
}
