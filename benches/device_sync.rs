//! Device sync costs (`gossipkv::device`) against a 3-node loopback cluster
//! of real `gossipkv serve` processes, with an API token over HTTPS.
//!
//! For n ∈ {10,000, 100,000} keys under a prefix (100-byte values; `--full`
//! adds n = 1,000,000) a device pulls the prefix, then after k ∈ {0, 10,
//! 1,000} of them change it catches up. Prints `metric:` lines:
//! - `catchup_k{k}_n{n}_bytes` and `_round_trips` (response bytes and
//!   requests of the catch-up);
//! - `catchup_k0_scaling`: k = 0 bytes at the largest n over the smallest
//!   (target ≤ 1.2: nothing changed costs the same whatever the store);
//! - `catchup_k0_round_trips` (target 1) and `catchup_k0_bytes` (target
//!   ≤ 1,024) at the smallest n;
//! - `catchup_bytes_over_changed`: k = 1,000 catch-up bytes over the
//!   changed entries' encoded size (target ≤ 1.5);
//! - `initial_pull_entries_per_s` at the largest n, and beside it, in the
//!   same run, an embedded store writing the same entries in batches of
//!   1,000: `device_pull_ratio_vs_store_batched` (target ≥ 0.5).
//!
//! Loading is bounded (n keys, batches of 125 puts at w=3, 8 at a time)
//! and shows progress on stderr.

#[path = "../tests/common/mod.rs"]
mod common;

use gossipkv::client::{Request, Response};
use gossipkv::device::Device;
use std::time::Instant;

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:07}")
}

/// Writes `keys` (with values of `fill`) through node 0's HTTP API.
async fn load(http: &reqwest::Client, base: &str, token: &str, keys: &[String], fill: u8) {
    let started = Instant::now();
    let value = String::from_utf8(vec![fill; 100]).unwrap();
    for (done, wave) in keys.chunks(125 * 8).enumerate() {
        let mut requests = tokio::task::JoinSet::new();
        for batch in wave.chunks(125) {
            let ops: Vec<_> = batch
                .iter()
                .map(|k| serde_json::json!({ "op": "put", "key": k, "value": value, "w": 3 }))
                .collect();
            let request = http
                .post(format!("{base}/v1/batch"))
                .bearer_auth(token)
                .json(&serde_json::json!({ "ops": ops }));
            requests.spawn(async move { request.send().await.map(|r| r.status()) });
        }
        while let Some(status) = requests.join_next().await {
            let status = status.expect("load task").expect("load request");
            assert_eq!(status, 200, "a load batch failed");
        }
        let written = ((done + 1) * 1000).min(keys.len());
        if written % 20_000 < 1000 || written == keys.len() {
            eprintln!(
                "  loaded {written} of {} keys ({:.0}/s)",
                keys.len(),
                written as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--full");
    let sizes: Vec<usize> = if full {
        vec![10_000, 100_000, 1_000_000]
    } else {
        vec![10_000, 100_000]
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async move {
        let (cluster, _clients) = common::started(3).await;
        let admin =
            gossipkv::client::Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
                .await
                .expect("admin");
        let Response::TokenCreated { secret, .. } = admin
            .request(&Request::TokenCreate {
                name: "bench".into(),
                prefixes: vec![b"bench/".to_vec()],
                read: true,
                write: true,
                expires_in_seconds: None,
            })
            .await
            .expect("token")
        else {
            panic!("no token");
        };
        let ca = std::fs::read(cluster.path().join("client/ca.pem")).expect("ca");
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca pem"))
            .build()
            .expect("client");
        let base = format!("https://{}", cluster.http[0]);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut k0_bytes = Vec::new();
        let mut last_pull_rate = 0.0;
        let mut over_changed = 0.0;
        for &n in &sizes {
            let prefix = format!("bench/n{n}/");
            let keys: Vec<String> = (0..n).map(|i| key(&prefix, i)).collect();
            eprintln!("n = {n}: loading");
            load(&http, &base, &secret, &keys, b'a').await;
            let device = Device::open(
                dir.path().join(format!("device-{n}")),
                &format!("https://{}", cluster.http[1]),
                http.clone(),
                Some(secret.clone()),
            )
            .expect("device");
            // Written at w=3: every replica holds every key.
            let started = Instant::now();
            let mut entries = 0;
            while entries < n {
                let report = device.pull(prefix.as_bytes(), |_| {}).await.expect("pull");
                entries += report.entries;
                assert!(
                    started.elapsed().as_secs() < 600,
                    "the initial pull never ends"
                );
            }
            last_pull_rate = n as f64 / started.elapsed().as_secs_f64();
            for k in [0usize, 10, 1000] {
                let changed: Vec<String> = (0..k).map(|i| keys[(i * 7919) % n].clone()).collect();
                load(&http, &base, &secret, &changed, b'b').await;
                let mut report = device
                    .pull(prefix.as_bytes(), |_| {})
                    .await
                    .expect("catch-up");
                let (mut bytes, mut trips, mut got) = (report.bytes, report.pages, report.entries);
                // Written at w=3; a page from a replica behind the cursor
                // would only come later.
                while got < k {
                    report = device
                        .pull(prefix.as_bytes(), |_| {})
                        .await
                        .expect("catch-up");
                    bytes += report.bytes;
                    trips += report.pages;
                    got += report.entries;
                }
                metric(&format!("catchup_k{k}_n{n}_bytes"), bytes as f64, "bytes");
                metric(
                    &format!("catchup_k{k}_n{n}_round_trips"),
                    trips as f64,
                    "requests",
                );
                if k == 0 {
                    k0_bytes.push((n, bytes, trips));
                }
                if k == 1000 {
                    let encoded: usize = changed
                        .iter()
                        .map(|key| {
                            device
                                .entry_bytes(key.as_bytes())
                                .expect("entry")
                                .unwrap_or(0)
                        })
                        .sum();
                    over_changed = bytes as f64 / encoded as f64;
                }
            }
        }
        let (small_n, small_bytes, small_trips) = k0_bytes[0];
        let (_, large_bytes, _) = k0_bytes[k0_bytes.len() - 1];
        eprintln!("k = 0 measured at n = {small_n}");
        metric("catchup_k0_round_trips", small_trips as f64, "requests");
        metric("catchup_k0_bytes", small_bytes as f64, "bytes");
        metric(
            "catchup_k0_scaling",
            large_bytes as f64 / small_bytes as f64,
            "ratio",
        );
        metric("catchup_bytes_over_changed", over_changed, "ratio");
        metric("initial_pull_entries_per_s", last_pull_rate, "entries/s");

        // The embedded store writing the same number of entries, batched.
        let n = sizes[sizes.len() - 1];
        let store = gossipkv::Store::open(
            dir.path().join("store.redb"),
            gossipkv::StoreOptions::default().node_id(gossipkv::NodeId(1)),
        )
        .expect("store");
        let started = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
            let mut batch = gossipkv::Batch::new();
            for &i in chunk {
                batch.put(key("store/", i).into_bytes(), vec![b'a'; 100]);
            }
            store.write(&batch).expect("store write");
        }
        let store_rate = n as f64 / started.elapsed().as_secs_f64();
        metric("store_batched_entries_per_s", store_rate, "entries/s");
        metric(
            "device_pull_ratio_vs_store_batched",
            last_pull_rate / store_rate,
            "ratio",
        );
    });
}
