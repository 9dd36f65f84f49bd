//! A 3-node loopback cluster of real `gossipkv serve` processes under load
//! from C ∈ {1, 8, 64} concurrent clients (tokio tasks sharing a few QUIC
//! connections): puts at W=1 and W=2, then gets at R=1 of the keys written,
//! throughput and p50 / p99 latency at each C. Beside it, in the same run,
//! one embedded [`Store`] (durable: one fsynced redb transaction per write)
//! doing the same puts from C threads. Keys are 16 random bytes, values 100
//! bytes.
//!
//! Every phase is bounded in time (`GOSSIPKV_BENCH_SECS`, default 5 s) and
//! in count ([`MAX_OPS`]); `-- --quick` runs a tenth of both. Prints
//! `metric: <name> <value> <unit>` lines on stdout, progress on stderr.
//! With `perf` (or else `strace`) on the PATH, also counts the fdatasync
//! calls of the coordinating node during the W=2 C=64 phase.

#[path = "../tests/common/mod.rs"]
mod common;

use gossipkv::client::Client;
use gossipkv::transport::tls::TlsIdentity;
use gossipkv::{Durability, Store, StoreOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY_BYTES: usize = 16;
const VALUE: [u8; 100] = [b'v'; 100];
const CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Requests a node runs at once per client connection (the default
/// `limits.client_streams_per_connection`): C clients share
/// ceil(C / 16) connections, so none waits for a stream.
const STREAMS_PER_CONNECTION: usize = 16;
/// Connections per pool (enough for the largest C); the pools together stay
/// well under the 32 connections a node allows one certificate.
const CONNECTIONS: usize = 64 / STREAMS_PER_CONNECTION;
/// The most operations one phase issues, however fast it goes.
const MAX_OPS: usize = 200_000;
/// A phase stops early after this many failed requests.
const MAX_ERRORS: usize = 100;
/// How long a phase may outlast its time bound (requests in flight finish
/// within the client's request timeout) before the bench gives up.
const GRACE: Duration = Duration::from_secs(30);
/// How long the reading node may take to hold every written key.
const CATCH_UP: Duration = Duration::from_secs(60);

type Key = [u8; KEY_BYTES];

fn metric(name: &str, value: f64, unit: &str) {
    println!("metric: {name} {value:.3} {unit}");
}

#[derive(Clone, Copy)]
struct Bounds {
    time: Duration,
    ops: usize,
}

fn bounds() -> Bounds {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs = match std::env::var("GOSSIPKV_BENCH_SECS") {
        Ok(s) => match s.parse::<f64>() {
            Ok(secs) if secs > 0.0 && secs.is_finite() => secs,
            _ => {
                eprintln!("GOSSIPKV_BENCH_SECS={s:?}: expected a positive number of seconds");
                std::process::exit(2);
            }
        },
        Err(_) => 5.0,
    };
    let scale = if quick { 0.1 } else { 1.0 };
    Bounds {
        time: Duration::from_secs_f64(secs * scale),
        ops: ((MAX_OPS as f64 * scale) as usize).max(1),
    }
}

/// What one phase did: acknowledged operations, their latencies, the keys
/// written (puts) and the keys not found (gets).
#[derive(Default)]
struct Outcome {
    latencies: Vec<Duration>,
    written: Vec<Key>,
    misses: usize,
    errors: usize,
    first_error: Option<String>,
    wall: Duration,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.latencies.extend(other.latencies);
        self.written.extend(other.written);
        self.misses += other.misses;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    /// Prints ops/s, p50 and p99 as `<name>_ops` etc.; returns ops/s.
    fn report(&mut self, name: &str) -> f64 {
        self.latencies.sort();
        let ops = self.latencies.len();
        let rate = ops as f64 / self.wall.as_secs_f64().max(1e-9);
        metric(&format!("{name}_ops"), rate, "ops/s");
        metric(
            &format!("{name}_p50_ms"),
            percentile(&self.latencies, 0.5),
            "ms",
        );
        metric(
            &format!("{name}_p99_ms"),
            percentile(&self.latencies, 0.99),
            "ms",
        );
        eprintln!(
            "  {name}: {ops} ops in {:.2} s, {} errors, {} not found{}",
            self.wall.as_secs_f64(),
            self.errors,
            self.misses,
            self.first_error
                .as_deref()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        );
        rate
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Hands out operation slots: `None` once the phase's count, time or error
/// bound is reached.
struct Gate {
    deadline: Instant,
    max_ops: usize,
    issued: AtomicUsize,
    errors: AtomicUsize,
}

impl Gate {
    fn new(bounds: Bounds) -> Gate {
        Gate {
            deadline: Instant::now() + bounds.time,
            max_ops: bounds.ops,
            issued: AtomicUsize::new(0),
            errors: AtomicUsize::new(0),
        }
    }

    fn next(&self) -> bool {
        Instant::now() < self.deadline
            && self.errors.load(Ordering::Relaxed) < MAX_ERRORS
            && self.issued.fetch_add(1, Ordering::Relaxed) < self.max_ops
    }

    fn failed(&self, out: &mut Outcome, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        out.errors += 1;
        out.first_error.get_or_insert(error);
    }
}

fn phase_start(name: &str, c: usize, bounds: Bounds) {
    eprintln!(
        "phase {name}: {c} clients, up to {:.1} s or {} ops",
        bounds.time.as_secs_f64(),
        bounds.ops
    );
}

#[derive(Clone)]
enum Work {
    Put,
    /// Reads of keys written before, picked at random.
    Get(Arc<Vec<Key>>),
}

/// `c` tasks, task `t` on connection `t % ceil(c / 16)` of `pool`, each
/// issuing one request at a time until the gate closes.
async fn cluster_phase(pool: &Arc<Vec<Client>>, c: usize, work: &Work, bounds: Bounds) -> Outcome {
    let connections = c.div_ceil(STREAMS_PER_CONNECTION).min(pool.len());
    let gate = Arc::new(Gate::new(bounds));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..c {
        let (pool, gate, work) = (pool.clone(), gate.clone(), work.clone());
        tasks.spawn(async move {
            let client = &pool[t % connections];
            let mut rng = StdRng::from_os_rng();
            let mut out = Outcome::default();
            while gate.next() {
                let (key, begun) = match &work {
                    Work::Put => (rng.random::<Key>(), Instant::now()),
                    Work::Get(keys) => (keys[rng.random_range(0..keys.len())], Instant::now()),
                };
                let result = match &work {
                    Work::Put => client.put(&key, &VALUE, None).await.map(|_| true),
                    Work::Get(_) => client.get(&key).await.map(|r| r.is_some()),
                };
                match result {
                    Ok(found) => {
                        out.latencies.push(begun.elapsed());
                        match work {
                            Work::Put => out.written.push(key),
                            Work::Get(_) if !found => out.misses += 1,
                            Work::Get(_) => {}
                        }
                    }
                    Err(e) => gate.failed(&mut out, e.to_string()),
                }
            }
            out
        });
    }
    let mut total = Outcome::default();
    let joined = tokio::time::timeout(bounds.time + GRACE, async {
        while let Some(out) = tasks.join_next().await {
            total.merge(out.expect("client task"));
        }
    })
    .await;
    if joined.is_err() {
        tasks.abort_all();
        panic!("a phase outlasted its bound by {GRACE:?}");
    }
    total.wall = start.elapsed();
    total
}

/// The same puts against one embedded durable store from `c` threads, one
/// transaction (and one fsync) per put.
fn local_phase(store: &Store, c: usize, bounds: Bounds) -> Outcome {
    let gate = Gate::new(bounds);
    let start = Instant::now();
    let mut total = Outcome::default();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..c)
            .map(|_| {
                scope.spawn(|| {
                    let mut rng = StdRng::from_os_rng();
                    let mut out = Outcome::default();
                    while gate.next() {
                        let key: Key = rng.random();
                        let begun = Instant::now();
                        match store.put(&key, &VALUE, None) {
                            Ok(_) => out.latencies.push(begun.elapsed()),
                            Err(e) => gate.failed(&mut out, e.to_string()),
                        }
                    }
                    out
                })
            })
            .collect();
        for thread in threads {
            total.merge(thread.join().expect("writer thread"));
        }
    });
    total.wall = start.elapsed();
    total
}

/// A running `perf stat` or `strace -c` attached to one process, counting
/// its fdatasync and fsync calls; killed when dropped.
struct SyncCounter {
    child: Child,
    tool: &'static str,
    out: PathBuf,
}

impl SyncCounter {
    /// The first of perf and strace that works here, attached to `pid`.
    fn attach(pid: u32, dir: &Path) -> Option<SyncCounter> {
        let out = dir.join("sync-counts.txt");
        let pid = pid.to_string();
        let perf = || {
            let mut cmd = Command::new("perf");
            cmd.args(["stat", "-x", ",", "-e"])
                .arg("syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync")
                .arg("-o")
                .arg(&out)
                .args(["-p", &pid]);
            cmd
        };
        let strace = || {
            let mut cmd = Command::new("strace");
            cmd.args(["-f", "-c", "-e", "trace=fdatasync,fsync", "-o"])
                .arg(&out)
                .args(["-p", &pid]);
            cmd
        };
        for (tool, probe, mut cmd) in [
            (
                "perf",
                ["stat", "-e", "syscalls:sys_enter_fdatasync", "--", "true"],
                perf(),
            ),
            ("strace", ["-c", "-o", "/dev/null", "--", "true"], strace()),
        ] {
            if !finishes_ok(Command::new(tool).args(probe)) {
                eprintln!("  fdatasync count: {tool} is not usable here");
                continue;
            }
            let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn();
            match child {
                Ok(child) => return Some(SyncCounter { child, tool, out }),
                Err(e) => eprintln!("  fdatasync count: cannot start {tool}: {e}"),
            }
        }
        None
    }

    /// Stops the tool (SIGINT, so it writes its counts) and reads
    /// (fdatasync, fsync) calls.
    fn finish(mut self) -> Option<(u64, u64)> {
        let interrupted = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while interrupted && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.out).ok()?;
        let count = |name: &str| -> Option<u64> {
            text.lines().find_map(|line| match self.tool {
                // perf -x,: "<count>,<unit>,<event>,..."
                "perf" => {
                    let fields: Vec<&str> = line.split(',').collect();
                    (fields.get(2)? == &format!("syscalls:sys_enter_{name}"))
                        .then(|| fields[0].parse().ok())?
                }
                // strace -c: "% time seconds usecs/call calls [errors] syscall"
                _ => {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.last()? == &name).then(|| fields.get(3)?.parse().ok())?
                }
            })
        };
        // strace omits syscalls that were never made.
        let missing = if self.tool == "perf" { None } else { Some(0) };
        Some((count("fdatasync").or(missing)?, count("fsync").or(missing)?))
    }
}

impl Drop for SyncCounter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `cmd` exits successfully within 10 s (killed otherwise).
fn finishes_ok(cmd: &mut Command) -> bool {
    let Ok(mut child) = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn() else {
        return false;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

async fn pool(addr: SocketAddr, tls: &TlsIdentity, w: u8) -> Arc<Vec<Client>> {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut client = common::client(addr, tls).await;
        client.set_quorum(w, 1);
        clients.push(client);
    }
    Arc::new(clients)
}

/// Waits (at most [`CATCH_UP`]) until `client`'s node holds `n` entries.
async fn caught_up(client: &Client, n: usize) {
    let start = Instant::now();
    let mut held = 0;
    while start.elapsed() < CATCH_UP {
        held = client.status().await.map_or(0, |s| s.entries_held);
        if held >= n as u64 {
            eprintln!(
                "  the reading node holds all {n} keys after {:.2} s",
                start.elapsed().as_secs_f64()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("  the reading node holds {held} of {n} keys after {CATCH_UP:?}; reading anyway");
}

fn main() {
    let bounds = bounds();
    let mut rates: BTreeMap<String, f64> = BTreeMap::new();

    // The embedded baseline first, before the nodes start competing for the
    // two cores and the disk.
    let local_dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        local_dir.path().join("local.redb"),
        StoreOptions::default().durability(Durability::Immediate),
    )
    .expect("open store");
    for c in CONCURRENCY {
        let name = format!("local_durable_put_c{c}");
        phase_start(&name, c, bounds);
        let rate = local_phase(&store, c, bounds).report(&name);
        rates.insert(name, rate);
    }
    drop(store);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        // The same cluster the multi-process tests use: certificates, three
        // `gossipkv serve` processes (killed when `cluster` drops, however
        // this ends), and a bounded wait until they settle.
        eprintln!("starting a 3-node cluster");
        let (cluster, status) = common::started(3).await;
        let tls = cluster.client_tls();
        // Puts go to node 0, gets to node 1 (R=1: answered from its copy).
        let puts = [
            (1, pool(cluster.addr(0), &tls, 1).await),
            (2, pool(cluster.addr(0), &tls, 2).await),
        ];
        let gets = pool(cluster.addr(1), &tls, 1).await;
        let mut written = Vec::new();

        for (w, pool) in &puts {
            for c in CONCURRENCY {
                let name = format!("cluster_put_w{w}_c{c}");
                phase_start(&name, c, bounds);
                let counter = (*w == 2 && c == 64)
                    .then(|| SyncCounter::attach(cluster.nodes[0].0.id(), cluster.path()))
                    .flatten();
                if counter.is_some() {
                    // Give the tool time to attach before the load starts.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let mut out = cluster_phase(pool, c, &Work::Put, bounds).await;
                let rate = out.report(&name);
                if let Some(counter) = counter {
                    let tool = counter.tool;
                    match counter.finish() {
                        Some((fdatasync, fsync)) => {
                            eprintln!(
                                "  node 0 ({tool}): {fdatasync} fdatasync, {fsync} fsync for {} puts",
                                out.latencies.len()
                            );
                            metric(
                                &format!("{name}_fdatasync_per_write"),
                                fdatasync as f64 / out.latencies.len().max(1) as f64,
                                "calls",
                            );
                        }
                        None => eprintln!("  fdatasync count: {tool} gave no counts; skipped"),
                    }
                } else if *w == 2 && c == 64 {
                    eprintln!("  fdatasync count skipped: neither perf nor strace works here");
                }
                written.append(&mut out.written);
                rates.insert(name, rate);
            }
        }

        eprintln!("waiting until node 1 holds the {} keys written", written.len());
        caught_up(&status[1], written.len()).await;
        let keys = Arc::new(written);
        for c in CONCURRENCY {
            let name = format!("cluster_get_r1_c{c}");
            phase_start(&name, c, bounds);
            if keys.is_empty() {
                eprintln!("  no keys were written; skipped");
                continue;
            }
            let rate = cluster_phase(&gets, c, &Work::Get(keys.clone()), bounds)
                .await
                .report(&name);
            rates.insert(name, rate);
        }
        drop(cluster);
    });

    let ratio = |name: &str, a: &str, b: &str| {
        if let (Some(a), Some(b)) = (rates.get(a), rates.get(b)) {
            metric(name, a / b, "ratio");
        }
    };
    ratio(
        "cluster_put_w2_c64_ratio_vs_local_durable",
        "cluster_put_w2_c64",
        "local_durable_put_c64",
    );
    ratio(
        "cluster_put_w2_c64_vs_c1",
        "cluster_put_w2_c64",
        "cluster_put_w2_c1",
    );
    // Earlier runs printed this one (8 clients, W=1, beside the store).
    ratio(
        "cluster_put_ratio_vs_local",
        "cluster_put_w1_c8",
        "local_durable_put_c8",
    );
}
