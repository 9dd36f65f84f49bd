//! A 3-node loopback cluster under a bounded load from concurrent clients:
//! put and get throughput and p50 / p99 latency at W=1 and W=2, beside the
//! same workload against one embedded store in the same run. Prints
//! `metric: <name> <value> <unit>` lines; `-- --quick` runs a tenth.

#[path = "../tests/common/mod.rs"]
mod common;

use gossipkv::client::Client;
use gossipkv::transport::tls::TlsIdentity;
use gossipkv::{Store, StoreOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const VALUE: [u8; 100] = [b'v'; 100];

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn key(client: usize, i: usize) -> Vec<u8> {
    format!("k{client:02}-{i:010}").into_bytes()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn report(prefix: &str, ops: usize, wall: Duration, mut latencies: Vec<Duration>) -> f64 {
    latencies.sort();
    let rate = ops as f64 / wall.as_secs_f64();
    metric(&format!("{prefix}_ops"), rate, "ops/s");
    metric(
        &format!("{prefix}_p50_ms"),
        percentile(&latencies, 0.5),
        "ms",
    );
    metric(
        &format!("{prefix}_p99_ms"),
        percentile(&latencies, 0.99),
        "ms",
    );
    rate
}

async fn run_clients(
    addr: SocketAddr,
    tls: &TlsIdentity,
    w: u8,
    per_client: usize,
    write: bool,
    tag: &str,
) -> (Duration, Vec<Duration>) {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..CLIENTS {
        let tls = tls.clone();
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, Some(&tls)).await.expect("connect");
            client.set_quorum(w, 1);
            let mut latencies = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let k = [tag.as_bytes(), &key(c, i)].concat();
                let t = Instant::now();
                if write {
                    client.put(&k, &VALUE, None).await.expect("put");
                } else {
                    client.get(&k).await.expect("get");
                }
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    (start.elapsed(), all)
}

fn local(dir: &std::path::Path, per_client: usize) -> f64 {
    let store =
        Arc::new(Store::open(dir.join("local.redb"), StoreOptions::default()).expect("store"));
    let start = Instant::now();
    let mut threads = Vec::new();
    for c in 0..CLIENTS {
        let store = store.clone();
        threads.push(std::thread::spawn(move || {
            let mut latencies = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                store.put(&key(c, i), &VALUE, None).expect("put");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let latencies: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    report(
        "local_put",
        CLIENTS * per_client,
        start.elapsed(),
        latencies,
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let per_client = if quick { 50 } else { 500 };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // The same cluster the multi-process tests use: certificates, three
        // `gossipkv serve` processes, and a bounded wait until they settle.
        let (cluster, _clients) = common::started(3).await;
        let tls = cluster.client_tls();
        let addrs: Vec<SocketAddr> = (0..3).map(|i| cluster.addr(i)).collect();
        let dir = &cluster.dir;
        eprintln!("cluster up; {CLIENTS} clients x {per_client} ops per phase");
        let ops = CLIENTS * per_client;
        let (wall, lat) = run_clients(addrs[0], &tls, 1, per_client, true, "w1").await;
        let w1 = report("cluster_put_w1", ops, wall, lat);
        let (wall, lat) = run_clients(addrs[0], &tls, 2, per_client, true, "w2").await;
        report("cluster_put_w2", ops, wall, lat);
        let (wall, lat) = run_clients(addrs[1], &tls, 1, per_client, false, "w1").await;
        report("cluster_get_r1", ops, wall, lat);
        let local_rate = local(dir.path(), per_client);
        metric("cluster_put_ratio_vs_local", w1 / local_rate, "ratio");
    });
}
