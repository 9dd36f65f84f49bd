//! The write path under load, against real `gossipkv serve` processes on
//! loopback: client writes go through the storage thread (group commit, one
//! durable commit per group), a client is answered only once the commit
//! holding its write is durable (and, at W=2, once a co-replica committed
//! it too), and client writes beyond the storage queue's cap are refused as
//! `Overloaded`.
//!
//! 1. kill -9 under concurrent writers (W=1 and W=2): no acknowledged write
//!    is lost, counters stay within [acknowledged, attempted], every node
//!    agrees.
//! 2. A saturating write load: every request succeeds or fails with a clear
//!    code within the client's timeout, nothing acknowledged is lost, and
//!    the load never makes a member suspect another.
//!
//! A run's seed is printed; `WRITE_PATH_SEED=<n>` repeats it.

mod common;

use common::*;
use gossipkv::client::{Client, ClientError, ErrorCode, Failure, Request, Response};
use gossipkv::transport::tls::TlsIdentity;
use gossipkv::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

// ---------------------------------------------------------------------------
// Shared

/// splitmix64: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("WRITE_PATH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// What a failed or answered write tells about whether it was applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Answered: durable on `w` replicas.
    Acknowledged,
    /// Refused before anything was written (never sent, or a code that
    /// says nothing was written).
    Failed,
    /// It may or may not have been applied: connection lost, no answer in
    /// time, a quorum not met (kept on the replicas it reached), a node
    /// failure.
    Indeterminate,
}

fn outcome<T>(result: &Result<T, ClientError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Acknowledged,
        Err(ClientError::Connect { .. }) => Outcome::Failed,
        Err(ClientError::Node(Failure { code, .. })) => match code {
            ErrorCode::Overloaded
            | ErrorCode::Unavailable
            | ErrorCode::BadRequest
            | ErrorCode::WrongType
            | ErrorCode::BadToken
            | ErrorCode::Forbidden => Outcome::Failed,
            ErrorCode::QuorumNotMet { .. } | ErrorCode::Timeout | ErrorCode::Internal => {
                Outcome::Indeterminate
            }
        },
        Err(_) => Outcome::Indeterminate,
    }
}

/// A short name for an error's kind, for the tallies.
fn kind_of(error: &ClientError) -> String {
    match error {
        ClientError::Connect { .. } => "connect".into(),
        ClientError::Refused { .. } => "refused".into(),
        ClientError::Request { reason, .. } if reason.contains("no answer within") => {
            "client timeout".into()
        }
        ClientError::Request { .. } => "connection lost".into(),
        ClientError::Node(Failure {
            code: ErrorCode::QuorumNotMet { .. },
            ..
        }) => "QuorumNotMet".into(),
        ClientError::Node(failure) => format!("{:?}", failure.code),
        ClientError::Unexpected(_) => "unexpected response".into(),
        other => format!("other: {other}"),
    }
}

/// Codes a node must never answer these well-formed writes with.
fn is_unexpected_kind(kind: &str) -> bool {
    matches!(
        kind,
        "refused" | "BadRequest" | "WrongType" | "BadToken" | "Forbidden" | "unexpected response"
    ) || kind.starts_with("other")
}

/// Waits until `done` holds, woken by `notify`, for at most `limit`.
async fn until(what: &str, notify: &Notify, limit: Duration, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            assert!(done(), "timed out waiting until {what}");
            return;
        }
    }
}

fn storage_figures(metrics: SocketAddr) -> (f64, f64) {
    let text = scrape(metrics);
    (
        metric(&text, "gossipkv_storage_commits_total").unwrap_or(0.0),
        metric(&text, "gossipkv_storage_writes_total").unwrap_or(0.0),
    )
}

// ---------------------------------------------------------------------------
// 1. kill -9 under concurrent writers

/// Concurrent writer tasks, each with its own connection to the node
/// written to.
const WRITERS: usize = 16;
/// Operations each writer attempts (a failed connection attempt is one).
const OPS_PER_WRITER: usize = 240;
/// Shared counters the writers add to.
const COUNTERS: usize = 4;
/// Client timeout of the writers: above the node's 5 s quorum timeout, so
/// a W=2 write that misses its quorum is answered, not timed out.
const WRITE_TIMEOUT: Duration = Duration::from_secs(8);
const SET_KEY: &[u8] = b"wp-set";

fn counter_key(k: usize) -> Vec<u8> {
    format!("wp-counter-{k}").into_bytes()
}

#[derive(Default)]
struct Tally {
    acked_puts: Vec<(String, String)>,
    unknown_puts: Vec<(String, String)>,
    acked_members: Vec<String>,
    attempted_members: Vec<String>,
    acked_adds: [i64; COUNTERS],
    attempted_adds: [i64; COUNTERS],
    unknown_adds: [u64; COUNTERS],
    acknowledged: u64,
    failed: u64,
    indeterminate: u64,
    /// Acknowledged after the last restart began.
    acknowledged_late: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn note<T>(&mut self, result: &Result<T, ClientError>, late: bool) -> Outcome {
        let o = outcome(result);
        match o {
            Outcome::Acknowledged => {
                self.acknowledged += 1;
                if late {
                    self.acknowledged_late += 1;
                }
            }
            Outcome::Failed => self.failed += 1,
            Outcome::Indeterminate => self.indeterminate += 1,
        }
        if let Err(e) = result {
            *self.errors.entry(kind_of(e)).or_default() += 1;
        }
        o
    }

    fn merge(&mut self, other: Tally) {
        self.acked_puts.extend(other.acked_puts);
        self.unknown_puts.extend(other.unknown_puts);
        self.acked_members.extend(other.acked_members);
        self.attempted_members.extend(other.attempted_members);
        for k in 0..COUNTERS {
            self.acked_adds[k] += other.acked_adds[k];
            self.attempted_adds[k] += other.attempted_adds[k];
            self.unknown_adds[k] += other.unknown_adds[k];
        }
        self.acknowledged += other.acknowledged;
        self.failed += other.failed;
        self.indeterminate += other.indeterminate;
        self.acknowledged_late += other.acknowledged_late;
        for (kind, n) in other.errors {
            *self.errors.entry(kind).or_default() += n;
        }
    }
}

/// What the writers share with the test driving the kills.
struct Load {
    addr: SocketAddr,
    tls: TlsIdentity,
    w: u8,
    seed: u64,
    deadline: Instant,
    /// Writes acknowledged so far, all writers.
    acknowledged: AtomicU64,
    /// Writers finished.
    finished: AtomicU64,
    /// Restarts begun so far; `restarts` in all.
    restarted: AtomicU64,
    restarts: u64,
    progress: Notify,
}

async fn writer(id: usize, load: Arc<Load>) -> Tally {
    let mut rng = Rng(load.seed ^ ((id as u64 + 1) << 40));
    let mut tally = Tally::default();
    let mut connection: Option<Client> = None;
    for op in 0..OPS_PER_WRITER {
        if Instant::now() >= load.deadline {
            break;
        }
        if connection.is_none() {
            match Client::connect(load.addr, Some(&load.tls)).await {
                Ok(mut c) => {
                    c.set_quorum(load.w, 1);
                    c.set_timeout(WRITE_TIMEOUT);
                    connection = Some(c);
                }
                Err(e) => {
                    tally.note::<()>(&Err(e), false);
                    // The node is down: a pause before dialling again, not
                    // a wait for a condition.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        let Some(c) = connection.as_ref() else {
            continue;
        };
        let late = || load.restarted.load(Relaxed) >= load.restarts;
        let lost_connection;
        let noted = match op % 3 {
            0 => {
                let k = rng.below(COUNTERS as u64) as usize;
                let amount = 1 + rng.below(1000) as i64;
                tally.attempted_adds[k] += amount;
                let result = c.counter_add(&counter_key(k), amount).await;
                lost_connection = matches!(result, Err(ClientError::Request { .. }));
                let noted = tally.note(&result, late());
                match noted {
                    Outcome::Acknowledged => tally.acked_adds[k] += amount,
                    Outcome::Indeterminate => tally.unknown_adds[k] += 1,
                    Outcome::Failed => {}
                }
                noted
            }
            1 => {
                let member = format!("m-{id:02}-{op:04}");
                tally.attempted_members.push(member.clone());
                let result = c
                    .request(&Request::SetAdd {
                        key: SET_KEY.to_vec(),
                        member: member.clone().into_bytes(),
                    })
                    .await
                    .and_then(|r| match r {
                        Response::Context(_) => Ok(()),
                        other => Err(ClientError::Unexpected(Box::new(other))),
                    });
                lost_connection = matches!(result, Err(ClientError::Request { .. }));
                let noted = tally.note(&result, late());
                if noted == Outcome::Acknowledged {
                    tally.acked_members.push(member);
                }
                noted
            }
            _ => {
                let key = format!("wp-put-{id:02}-{op:04}");
                let value = format!("value-{}-{id}-{op}-{:x}", load.seed, rng.next());
                let result = c.put(key.as_bytes(), value.as_bytes(), None).await;
                lost_connection = matches!(result, Err(ClientError::Request { .. }));
                let noted = tally.note(&result, late());
                match noted {
                    Outcome::Acknowledged => tally.acked_puts.push((key, value)),
                    Outcome::Indeterminate => tally.unknown_puts.push((key, value)),
                    Outcome::Failed => {}
                }
                noted
            }
        };
        if lost_connection {
            // Dead (the node was killed) or stuck: dial afresh.
            if let Some(c) = connection.take() {
                c.close().await;
            }
        }
        if noted == Outcome::Acknowledged {
            load.acknowledged.fetch_add(1, Relaxed);
            load.progress.notify_waiters();
        }
    }
    if let Some(c) = connection.take() {
        c.close().await;
    }
    load.finished.fetch_add(1, Relaxed);
    load.progress.notify_waiters();
    tally
}

/// Reads from every node (R=1) until every acknowledged write is there and
/// the nodes agree, then checks the counters and the set against what was
/// attempted. Panics with what is missing if that takes over 60 s.
async fn check_converged(cluster: &Cluster, tls: &TlsIdentity, t: &Tally, seed: u64) {
    let mut readers = Vec::new();
    for i in 0..cluster.nodes.len() {
        readers.push(client(cluster.addr(i), tls).await);
    }
    let n = readers.len();
    let mut missing: Vec<BTreeSet<usize>> = vec![(0..t.acked_puts.len()).collect(); n];
    let mut wrong: BTreeMap<(usize, String), String> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (counters, sets) = loop {
        for (node, c) in readers.iter().enumerate() {
            let mut still = BTreeSet::new();
            for &i in &missing[node] {
                let (key, value) = &t.acked_puts[i];
                match c.get(key.as_bytes()).await {
                    Ok(Some(r)) if r.value == Value::Register(vec![value.as_bytes().to_vec()]) => {
                        wrong.remove(&(node, key.clone()));
                    }
                    Ok(Some(r)) => {
                        wrong.insert((node, key.clone()), format!("{:?}", r.value));
                        still.insert(i);
                    }
                    _ => {
                        still.insert(i);
                    }
                }
            }
            missing[node] = still;
        }
        let mut counters: Vec<Vec<Option<i64>>> = Vec::new();
        let mut sets: Vec<Option<BTreeSet<String>>> = Vec::new();
        for c in &readers {
            let mut row = Vec::new();
            for k in 0..COUNTERS {
                row.push(c.counter(&counter_key(k)).await.ok());
            }
            counters.push(row);
            let members = match c
                .request(&Request::SetMembers {
                    key: SET_KEY.to_vec(),
                })
                .await
            {
                Ok(Response::Members(m)) => Some(
                    m.into_iter()
                        .map(|m| String::from_utf8_lossy(&m).into_owned())
                        .collect(),
                ),
                _ => None,
            };
            sets.push(members);
        }
        let acked_members: BTreeSet<String> = t.acked_members.iter().cloned().collect();
        let puts_everywhere = missing.iter().all(BTreeSet::is_empty);
        let counters_agree = counters.iter().all(|row| row == &counters[0])
            && counters[0]
                .iter()
                .zip(&t.acked_adds)
                .all(|(v, &acked)| v.is_some_and(|v| v >= acked));
        let sets_agree = sets.iter().all(|s| s == &sets[0])
            && sets[0]
                .as_ref()
                .is_some_and(|s| s.is_superset(&acked_members));
        if puts_everywhere && counters_agree && sets_agree {
            break (counters, sets);
        }
        if Instant::now() > deadline {
            let mut report = format!(
                "seed {seed}: the nodes did not converge on every acknowledged write within 60 s\n"
            );
            for (node, m) in missing.iter().enumerate() {
                let keys: Vec<&str> = m
                    .iter()
                    .take(10)
                    .map(|&i| t.acked_puts[i].0.as_str())
                    .collect();
                report += &format!(
                    "node {}: {} of {} acknowledged puts missing or wrong, e.g. {keys:?}\n",
                    node + 1,
                    m.len(),
                    t.acked_puts.len()
                );
            }
            for ((node, key), value) in wrong.iter().take(10) {
                report += &format!("node {}: {key} holds {value}\n", node + 1);
            }
            report += &format!(
                "counters per node {counters:?}, acknowledged sums {:?}, attempted sums {:?}\n",
                t.acked_adds, t.attempted_adds
            );
            for (node, s) in sets.iter().enumerate() {
                match s {
                    Some(s) => {
                        let lost: Vec<&String> = acked_members.difference(s).take(10).collect();
                        report += &format!(
                            "node {}: set holds {} members, {} acknowledged ones missing, e.g. {lost:?}\n",
                            node + 1,
                            s.len(),
                            acked_members.difference(s).count()
                        );
                    }
                    None => report += &format!("node {}: set unreadable\n", node + 1),
                }
            }
            panic!("{report}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Converged: the agreed values lie within what was attempted.
    let attempted_members: BTreeSet<String> = t.attempted_members.iter().cloned().collect();
    let set = sets[0].clone().unwrap_or_default();
    let phantom: Vec<&String> = set.difference(&attempted_members).take(10).collect();
    assert!(
        phantom.is_empty(),
        "seed {seed}: the set holds members never added: {phantom:?}"
    );
    for k in 0..COUNTERS {
        let value = counters[0][k].unwrap_or_default();
        assert!(
            value <= t.attempted_adds[k],
            "seed {seed}: counter {k} is {value}, above the {} attempted (acknowledged {})",
            t.attempted_adds[k],
            t.acked_adds[k]
        );
        if t.unknown_adds[k] == 0 {
            assert_eq!(
                value, t.acked_adds[k],
                "seed {seed}: counter {k} with no indeterminate add differs from its acknowledged adds"
            );
        }
    }
    // A write whose outcome is unknown is there whole or not at all.
    for (key, value) in &t.unknown_puts {
        if let Ok(Some(r)) = readers[0].get(key.as_bytes()).await {
            assert_eq!(
                r.value,
                Value::Register(vec![value.as_bytes().to_vec()]),
                "seed {seed}: {key}"
            );
        }
    }
    println!(
        "counters {:?}: acknowledged {:?}, attempted {:?}, indeterminate adds {:?}; set {} members ({} acknowledged, {} attempted)",
        counters[0],
        t.acked_adds,
        t.attempted_adds,
        t.unknown_adds,
        set.len(),
        t.acked_members.len(),
        t.attempted_members.len()
    );
}

/// WRITERS writer tasks against node 1 at quorum `w`; `victims` are
/// killed with -9 and restarted in turn, mid-load.
async fn kill9_under_load(w: u8, victims: &[usize]) {
    let _slot = SLOTS.acquire().await.unwrap();
    let seed = seed();
    println!("w={w}: seed {seed}, victims {victims:?}");
    let (mut cluster, clients) = started(3).await;
    let tls = cluster.client_tls();
    let load = Arc::new(Load {
        addr: cluster.addr(0),
        tls: tls.clone(),
        w,
        seed,
        deadline: Instant::now() + Duration::from_secs(50),
        acknowledged: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        restarted: AtomicU64::new(0),
        restarts: victims.len() as u64,
        progress: Notify::new(),
    });
    let began = Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| tokio::spawn(writer(id, load.clone())))
        .collect();
    let total = (WRITERS * OPS_PER_WRITER) as u64;
    for (n, &victim) in victims.iter().enumerate() {
        // Kill at 1/(k+2), 2/(k+2), ... of the writes acknowledged.
        let at = total * (n as u64 + 1) / (victims.len() as u64 + 2);
        until(
            "enough writes are acknowledged to kill mid-load",
            &load.progress,
            Duration::from_secs(60),
            || load.acknowledged.load(Relaxed) >= at || load.finished.load(Relaxed) > 0,
        )
        .await;
        let acked = load.acknowledged.load(Relaxed);
        cluster.kill(victim);
        println!(
            "w={w}: killed node {} after {acked} acknowledged writes ({:.1} s)",
            victim + 1,
            began.elapsed().as_secs_f64()
        );
        cluster.restart(victim);
        load.restarted.fetch_add(1, Relaxed);
        // Back before the next kill (the writers keep going meanwhile).
        client(cluster.addr(victim), &tls).await;
    }
    let mut total_tally = Tally::default();
    for writer in writers {
        let tally = tokio::time::timeout(Duration::from_secs(120), writer)
            .await
            .expect("a writer outlived its bounds")
            .unwrap();
        total_tally.merge(tally);
    }
    let t = total_tally;
    let elapsed = began.elapsed().as_secs_f64();
    let (commits, writes) = storage_figures(cluster.metrics[0]);
    println!(
        "w={w}: {} ops in {elapsed:.1} s: acknowledged {}, indeterminate {}, failed {}; acknowledged after the last restart {}; errors {:?}",
        t.acknowledged + t.indeterminate + t.failed,
        t.acknowledged,
        t.indeterminate,
        t.failed,
        t.acknowledged_late,
        t.errors
    );
    println!(
        "w={w}: node 1 since its restart: {commits} commits, {writes} writes, {:.1} writes per commit",
        writes / commits.max(1.0)
    );
    let unexpected: Vec<(&String, &u64)> = t
        .errors
        .iter()
        .filter(|(k, _)| is_unexpected_kind(k))
        .collect();
    assert!(
        unexpected.is_empty(),
        "seed {seed}: unexpected errors: {unexpected:?}"
    );
    assert!(
        t.acknowledged_late > 0,
        "seed {seed}: no write was acknowledged after the last restart: the writers did not continue"
    );
    drop(clients);
    let mut fresh = Vec::new();
    for i in 0..3 {
        fresh.push(client(cluster.addr(i), &tls).await);
    }
    settled(&fresh, 3).await;
    check_converged(&cluster, &tls, &t, seed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_concurrent_writers_loses_no_acknowledged_write_at_w1() {
    // The node the clients write to dies.
    kill9_under_load(1, &[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_concurrent_writers_loses_no_acknowledged_write_at_w2() {
    // A co-replica dies, then the node the clients write to.
    kill9_under_load(2, &[1, 0]).await;
}

// ---------------------------------------------------------------------------
// 2. A saturating write load

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn sat_value(key: &str, size: usize) -> Vec<u8> {
    let mut value = key.as_bytes().to_vec();
    value.resize(size, b'.');
    value
}

#[derive(Default)]
struct SatTally {
    acked: Vec<String>,
    overloaded: u64,
    quorum: u64,
    node_timeout: u64,
    unexpected: Vec<String>,
    max_latency: Duration,
}

#[derive(Default)]
struct Watch {
    samples_ok: [u64; 3],
    samples_failed: [u64; 3],
    suspicions: Vec<String>,
    peak_queued: [f64; 3],
    declared_down: [f64; 3],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturating_write_load_is_refused_or_waits_and_no_member_is_suspected() {
    // Alone on the machine: another cluster's load would starve this one's
    // gossip for reasons of its own.
    let _slots = SLOTS.acquire_many(2).await.unwrap();
    let connections = knob("WP_CONNS", 24) as usize;
    let streams = knob("WP_STREAMS", 16) as usize;
    let limit = knob("WP_LIMIT", 16);
    let all_nodes = knob("WP_ALL", 0) == 1;
    let value_size = knob("WP_VALUE_KIB", 64) as usize * 1024;
    let load_time = Duration::from_secs(knob("WP_SECS", 10));
    let cap = knob("WP_CAP", 40_000);
    let config = format!("[limits]\nclient_streams_per_connection = {limit}\n");
    let mut cluster = Cluster::forming_with_config(3, Some(&config));
    cluster.add_node();
    cluster.add_node();
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(client(cluster.addr(i), &tls).await);
    }
    settled(&clients, 3).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = Arc::new(Mutex::new(Watch::default()));
    let began = Instant::now();
    let mut watchers = Vec::new();
    let admin_tls = cluster.admin_tls();
    for node in 0..3 {
        let (stop, watch, addr, tls) = (
            stop.clone(),
            watch.clone(),
            cluster.addr(node),
            admin_tls.clone(),
        );
        watchers.push(tokio::spawn(async move {
            let mut admin = Client::connect_admin(addr, Some(&tls)).await.unwrap();
            admin.set_timeout(Duration::from_secs(3));
            while !stop.load(Relaxed) {
                let sample = admin.request(&Request::ClusterMembers).await;
                {
                    let mut w = watch.lock().unwrap();
                    match sample {
                        Ok(Response::ClusterMembers(members)) => {
                            w.samples_ok[node] += 1;
                            for m in members {
                                if m.state == "suspect" || m.state == "down" {
                                    let seen = format!(
                                        "node {} saw {} {} at {:.1} s (last heard {:?} ms ago)",
                                        node + 1,
                                        m.name,
                                        m.state,
                                        began.elapsed().as_secs_f64(),
                                        m.last_heard_ms
                                    );
                                    w.suspicions.push(seen);
                                }
                            }
                        }
                        _ => w.samples_failed[node] += 1,
                    }
                }
                // A sampling period.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    {
        let (stop, watch, metrics) = (stop.clone(), watch.clone(), cluster.metrics.clone());
        watchers.push(tokio::task::spawn_blocking(move || {
            while !stop.load(Relaxed) {
                for (node, &addr) in metrics.iter().enumerate() {
                    let text = scrape(addr);
                    let queued = metric(&text, "gossipkv_storage_queued_writes").unwrap_or(0.0);
                    let down = metric(&text, "gossipkv_members_declared_down_total").unwrap_or(0.0);
                    let mut w = watch.lock().unwrap();
                    w.peak_queued[node] = w.peak_queued[node].max(queued);
                    w.declared_down[node] = w.declared_down[node].max(down);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }

    let issued = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + load_time;
    let mut tasks = Vec::new();
    for conn in 0..connections {
        let node = if all_nodes { conn % 3 } else { 0 };
        let mut c = client(cluster.addr(node), &tls).await;
        c.set_quorum(if conn % 2 == 0 { 1 } else { 2 }, 1);
        let c = Arc::new(c);
        for stream in 0..streams {
            let (c, issued) = (c.clone(), issued.clone());
            tasks.push(tokio::spawn(async move {
                let mut t = SatTally::default();
                for i in 0.. {
                    if Instant::now() >= deadline || issued.fetch_add(1, Relaxed) >= cap {
                        break;
                    }
                    let key = format!("sat-{conn:02}-{stream:04}-{i:05}");
                    let value = sat_value(&key, value_size);
                    let start = Instant::now();
                    let result = c.put(key.as_bytes(), &value, None).await;
                    t.max_latency = t.max_latency.max(start.elapsed());
                    match result {
                        Ok(_) => t.acked.push(key),
                        Err(ClientError::Node(Failure {
                            code: ErrorCode::Overloaded,
                            ..
                        })) => {
                            t.overloaded += 1;
                            // What the error asks for.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(ClientError::Node(Failure {
                            code: ErrorCode::QuorumNotMet { .. },
                            ..
                        })) => t.quorum += 1,
                        Err(ClientError::Node(Failure {
                            code: ErrorCode::Timeout,
                            ..
                        })) => t.node_timeout += 1,
                        Err(e) => t.unexpected.push(format!("{key}: {e}")),
                    }
                }
                t
            }));
        }
    }
    let mut t = SatTally::default();
    for task in tasks {
        let part = task.await.unwrap();
        t.acked.extend(part.acked);
        t.overloaded += part.overloaded;
        t.quorum += part.quorum;
        t.node_timeout += part.node_timeout;
        t.unexpected.extend(part.unexpected);
        t.max_latency = t.max_latency.max(part.max_latency);
    }
    let load_secs = began.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for w in watchers {
        w.await.unwrap();
    }
    let w = watch.lock().unwrap();
    println!(
        "saturation: {} streams ({connections} connections x {streams}) of {} KiB puts for {load_secs:.1} s: ok {}, overloaded {}, quorum not met {}, node timeout {}, other errors {}; max latency {:.2} s",
        connections * streams,
        value_size / 1024,
        t.acked.len(),
        t.overloaded,
        t.quorum,
        t.node_timeout,
        t.unexpected.len(),
        t.max_latency.as_secs_f64()
    );
    for node in 0..3 {
        let (commits, writes) = storage_figures(cluster.metrics[node]);
        println!(
            "saturation: node {}: peak gossipkv_storage_queued_writes {}, {commits} commits, {writes} writes, {:.1} writes per commit; member samples {} ok, {} failed",
            node + 1,
            w.peak_queued[node],
            writes / commits.max(1.0),
            w.samples_ok[node],
            w.samples_failed[node]
        );
    }
    println!(
        "suspicions: {:?}",
        &w.suspicions[..w.suspicions.len().min(20)]
    );
    println!(
        "unexpected: {:?}",
        &t.unexpected[..t.unexpected.len().min(10)]
    );
}
