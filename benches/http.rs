//! The HTTP API beside the QUIC client protocol, in the same run, against
//! the same 3-node loopback cluster of real `gossipkv serve` processes:
//! puts (W=1) then gets (R=1) of the keys written, from C ∈ {8, 64}
//! concurrent clients, through node 0. The HTTP client is reqwest over
//! HTTPS with a client certificate (HTTP/2, one connection, as a mobile or
//! edge app would hold); the QUIC one is the crate's `Client` (C / 16
//! connections). Keys are 32 hex digits, values 100 bytes, on both.
//!
//! Prints `metric:` lines: ops/s, p50 and p99 per phase, and
//! `http_put_ratio_vs_quic`, `http_get_ratio_vs_quic` at each C (target
//! ≥ 0.7). Then, when `wrk` is installed (Debian's `wrk`; `.ci/run` does
//! not need it), the GET path again from a load generator no one here
//! wrote: `wrk` with C HTTP/1.1 connections and an API token (it presents
//! no client certificate), random keys of those written, beside the QUIC
//! figure: `wrk_get_c{C}_ops`, `wrk_get_ratio_vs_quic`. Every phase is bounded in time (`GOSSIPKV_BENCH_SECS`, default
//! 5 s; `-- --quick` a tenth) and in count (200,000 operations).

#[path = "../tests/common/mod.rs"]
mod common;

use rand::Rng;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VALUE: [u8; 100] = [b'v'; 100];
const CONCURRENCY: [usize; 2] = [8, 64];
const MAX_OPS: usize = 200_000;
const MAX_ERRORS: usize = 100;

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

fn phase_time() -> Duration {
    let secs = std::env::var("GOSSIPKV_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && s.is_finite())
        .unwrap_or(5.0);
    let quick = std::env::args().any(|a| a == "--quick");
    Duration::from_secs_f64(if quick { secs / 10.0 } else { secs })
}

/// Runs `c` tasks, each issuing `op(i)` one at a time until the phase's
/// time, count or error bound; prints and returns ops/s.
async fn phase<F, Fut>(name: &str, c: usize, time: Duration, op: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    eprintln!(
        "phase {name}: {c} clients, up to {:.1} s",
        time.as_secs_f64()
    );
    let op = Arc::new(op);
    let issued = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let deadline = Instant::now() + time;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (op, issued, errors, first_error) = (
            op.clone(),
            issued.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if i >= MAX_OPS
                    || Instant::now() >= deadline
                    || errors.load(Ordering::Relaxed) >= MAX_ERRORS
                {
                    return latencies;
                }
                let began = Instant::now();
                match op(i).await {
                    Ok(()) => latencies.push(began.elapsed()),
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.lock().unwrap().get_or_insert(e);
                    }
                }
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("a bench task panicked"));
    }
    let wall = start.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let rate = latencies.len() as f64 / wall.as_secs_f64();
    metric(&format!("{name}_ops"), rate, "ops/s");
    metric(&format!("{name}_p50_ms"), pct(0.5), "ms");
    metric(&format!("{name}_p99_ms"), pct(0.99), "ms");
    eprintln!(
        "  {name}: {} ops in {:.2} s, {} errors{}",
        latencies.len(),
        wall.as_secs_f64(),
        errors.load(Ordering::Relaxed),
        first_error
            .lock()
            .unwrap()
            .as_deref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    rate
}

fn key(i: usize, prefix: &str) -> String {
    format!("{prefix}{i:031x}")
}

fn main() {
    let time = phase_time();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        eprintln!("starting a 3-node cluster");
        let (cluster, _status) = common::started(3).await;
        let tls = cluster.client_tls();
        let mut quic = Vec::new();
        for _ in 0..4 {
            quic.push(common::client(cluster.addr(0), &tls).await);
        }
        let quic = Arc::new(quic);
        let ca = std::fs::read(cluster.path().join("client/ca.pem")).expect("ca.pem");
        let mut pem = std::fs::read(cluster.path().join("client/cert.pem")).expect("cert.pem");
        pem.extend(std::fs::read(cluster.path().join("client/key.pem")).expect("key.pem"));
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
            .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
            .http2_prior_knowledge()
            .build()
            .expect("HTTP client");
        let base = format!("https://{}/v1/kv/", cluster.http[0]);
        let mut rates = std::collections::BTreeMap::new();
        let mut http_written = std::collections::BTreeMap::new();
        for c in CONCURRENCY {
            // Puts: each phase writes its own keys; the gets read them.
            let written = Arc::new(AtomicUsize::new(0));
            let q = quic.clone();
            let w = written.clone();
            let name = format!("quic_put_c{c}");
            let rate = phase(&name, c, time, move |i| {
                let (q, w) = (q.clone(), w.clone());
                async move {
                    let k = key(i, "q");
                    q[i % q.len()]
                        .put(k.as_bytes(), &VALUE, None)
                        .await
                        .map_err(|e| e.to_string())?;
                    w.fetch_max(i + 1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await;
            rates.insert(name, rate);
            let quic_keys = written.load(Ordering::Relaxed).max(1);

            let written = Arc::new(AtomicUsize::new(0));
            let (h, b, w) = (http.clone(), base.clone(), written.clone());
            let name = format!("http_put_c{c}");
            let rate = phase(&name, c, time, move |i| {
                let (h, b, w) = (h.clone(), b.clone(), w.clone());
                async move {
                    let response = h
                        .put(format!("{b}{}", key(i, "h")))
                        .body(VALUE.to_vec())
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if !response.status().is_success() {
                        return Err(format!("status {}", response.status()));
                    }
                    response.bytes().await.map_err(|e| e.to_string())?;
                    w.fetch_max(i + 1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await;
            rates.insert(name, rate);
            let http_keys = written.load(Ordering::Relaxed).max(1);
            http_written.insert(c, http_keys);

            let q = quic.clone();
            let name = format!("quic_get_c{c}");
            let rate = phase(&name, c, time, move |i| {
                let q = q.clone();
                async move {
                    let k = key(rand::rng().random_range(0..quic_keys), "q");
                    let _ = i;
                    q[i % q.len()]
                        .get(k.as_bytes())
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(())
                }
            })
            .await;
            rates.insert(name, rate);

            let (h, b) = (http.clone(), base.clone());
            let name = format!("http_get_c{c}");
            let rate = phase(&name, c, time, move |_| {
                let (h, b) = (h.clone(), b.clone());
                async move {
                    let k = key(rand::rng().random_range(0..http_keys), "h");
                    let response = h
                        .get(format!("{b}{k}"))
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    // 404 is a read too (a put whose key index was skipped).
                    if !(response.status().is_success() || response.status() == 404) {
                        return Err(format!("status {}", response.status()));
                    }
                    response.bytes().await.map_err(|e| e.to_string())?;
                    Ok(())
                }
            })
            .await;
            rates.insert(name, rate);
        }
        for c in CONCURRENCY {
            for op in ["put", "get"] {
                let (h, q) = (
                    rates[&format!("http_{op}_c{c}")],
                    rates[&format!("quic_{op}_c{c}")],
                );
                metric(
                    &format!("http_{op}_c{c}_ratio_vs_quic"),
                    h / q.max(1e-9),
                    "ratio",
                );
            }
        }
        let worst = |op: &str| {
            CONCURRENCY
                .iter()
                .map(|c| {
                    rates[&format!("http_{op}_c{c}")] / rates[&format!("quic_{op}_c{c}")].max(1e-9)
                })
                .fold(f64::INFINITY, f64::min)
        };
        metric("http_put_ratio_vs_quic", worst("put"), "ratio");
        metric("http_get_ratio_vs_quic", worst("get"), "ratio");
        wrk_phases(&cluster, time, &http_written, &rates).await;
        drop(cluster);
    });
}

/// The GET path from `wrk` (see the module docs); skipped with a note when
/// `wrk` is not installed.
async fn wrk_phases(
    cluster: &common::Cluster,
    time: Duration,
    written: &std::collections::BTreeMap<usize, usize>,
    rates: &std::collections::BTreeMap<String, f64>,
) {
    if std::process::Command::new("wrk")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("wrk is not installed (apt-get install wrk): its GET phases are skipped");
        return;
    }
    let admin =
        gossipkv::client::Client::connect_admin(cluster.addr(0), Some(&cluster.admin_tls()))
            .await
            .expect("admin connection");
    let request = gossipkv::client::Request::TokenCreate {
        name: "bench".into(),
        prefixes: vec![b"h".to_vec()],
        read: true,
        write: false,
        expires_in_seconds: Some(3600),
    };
    let secret = match admin.request(&request).await {
        Ok(gossipkv::client::Response::TokenCreated { secret, .. }) => secret,
        other => panic!("making a token failed: {other:?}"),
    };
    let mut worst = f64::INFINITY;
    for (&c, &keys) in written {
        let script = cluster.path().join(format!("wrk-{c}.lua"));
        std::fs::write(
            &script,
            format!(
                "math.randomseed(os.time())\n\
                 request = function()\n\
                 \x20 local path = string.format(\"/v1/kv/h%031x\", math.random(0, {} - 1))\n\
                 \x20 return wrk.format(\"GET\", path, {{[\"Authorization\"] = \"Bearer {secret}\"}})\n\
                 end\n",
                keys
            ),
        )
        .expect("wrk script");
        let secs = time.as_secs().max(1);
        let output = std::process::Command::new("wrk")
            .args([
                "-t2",
                &format!("-c{c}"),
                &format!("-d{secs}s"),
                "--latency",
                "-s",
            ])
            .arg(&script)
            .arg(format!("https://{}/", cluster.http[0]))
            .output()
            .expect("wrk runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_string()))
        };
        let Some(rate) = field("Requests/sec:").and_then(|v| v.parse::<f64>().ok()) else {
            eprintln!(
                "wrk printed no rate:\n{text}\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            return;
        };
        if let Some(errors) = field("Non-2xx or 3xx responses:") {
            eprintln!("wrk at c={c}: {errors} non-2xx answers (404s of skipped puts count)");
        }
        metric(&format!("wrk_get_c{c}_ops"), rate, "ops/s");
        for (label, name) in [("50%", "p50"), ("99%", "p99")] {
            if let Some(ms) = field(label).and_then(|v| wrk_ms(&v)) {
                metric(&format!("wrk_get_c{c}_{name}_ms"), ms, "ms");
            }
        }
        let ratio = rate / rates[&format!("quic_get_c{c}")].max(1e-9);
        metric(&format!("wrk_get_c{c}_ratio_vs_quic"), ratio, "ratio");
        worst = worst.min(ratio);
    }
    metric("wrk_get_ratio_vs_quic", worst, "ratio");
}

/// A wrk latency (`812.00us`, `1.20ms`, `2.01s`) in milliseconds.
fn wrk_ms(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}
