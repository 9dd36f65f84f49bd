//! A 3-node loopback cluster under a bounded load from concurrent clients:
//! put and get throughput and p50 / p99 latency at W=1 and W=2, beside the
//! same workload against one embedded store in the same run. Prints
//! `metric: <name> <value> <unit>` lines; `-- --quick` runs a tenth.

use gossipkv::certs;
use gossipkv::client::Client;
use gossipkv::transport::tls::TlsIdentity;
use gossipkv::{Store, StoreOptions};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const VALUE: [u8; 100] = [b'v'; 100];

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "bench").expect("ca");
    certs::issue(&ca, "client", true, &dir.path().join("client")).expect("client cert");
    let mut nodes = Nodes(Vec::new());
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for i in 1..=3 {
        let node_dir = dir.path().join(format!("node-{i}"));
        certs::issue(&ca, &format!("node-{i}"), false, &node_dir.join("tls")).expect("node cert");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut command = Command::new(env!("CARGO_BIN_EXE_gossipkv"));
        command
            .args([
                "serve",
                "--node-id",
                &format!("{i:x}"),
                "--listen",
                &addr.to_string(),
            ])
            .arg("--data-dir")
            .arg(node_dir.join("data"))
            .arg("--tls-dir")
            .arg(node_dir.join("tls"))
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(first) = addrs.first() {
            command.args(["--seeds", &first.to_string()]);
        }
        nodes.0.push(command.spawn().expect("start node"));
        addrs.push(addr);
    }
    let tls = TlsIdentity::load(&dir.path().join("client")).expect("client tls");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // Wait (bounded) until the cluster has settled: 3 members, layout done.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut ready = true;
            for &addr in &addrs {
                let ok = match Client::connect(addr, Some(&tls)).await {
                    Ok(c) => c.status().await.is_ok_and(|s| {
                        s.members_alive == 3
                            && s.layout_version == s.layout_completed
                            && s.partitions_held == 256
                    }),
                    Err(_) => false,
                };
                ready &= ok;
            }
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
