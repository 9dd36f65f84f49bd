//! The write path under load, against real `gossipkv serve` processes on
//! loopback: client writes go through the storage thread (group commit, one
//! durable commit per group), a client is answered only once the commit
//! holding its write is durable (and, at W=2, once a co-replica committed
//! it too), and client writes beyond the storage queue's cap are refused as
//! `Overloaded`.
//!
//! 1. kill -9 under concurrent writers (W=1 and W=2): no acknowledged write
//!    is lost, counters stay within [acknowledged, attempted], every node
//!    agrees. And kill -9 of a lone node mid-load: every acknowledged write
//!    is in its own store after the restart (from its write-ahead log).
//! 2. Write loads (one that fills the storage queue to its cap, one at the
//!    default limits with 64 KiB values): every request succeeds or fails
//!    with a clear code within the client's timeout, nothing acknowledged
//!    is lost, and the load never makes a member suspect another.
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
    for (k, value) in counters[0].iter().enumerate() {
        let value = value.unwrap_or_default();
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

/// A node alone: no other replica holds its writes, and the ones made since
/// its last checkpoint (every 10 s) are durable only through its
/// write-ahead log. Killed with -9 mid-load and restarted, it must answer
/// every acknowledged put with its value, and its counter must hold every
/// acknowledged add and no more than were attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_lone_node_loses_no_acknowledged_write() {
    const WRITERS: usize = 16;
    let (mut cluster, _) = started(1).await;
    let tls = cluster.client_tls();
    let mut lone = client(cluster.addr(0), &tls).await;
    // Requests in flight at the kill fail at this timeout.
    lone.set_timeout(Duration::from_secs(2));
    let client = Arc::new(lone);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
        tasks.spawn(async move {
            // (acknowledged puts, acknowledged adds, attempted adds)
            let (mut puts, mut adds, mut attempted) = (Vec::new(), 0i64, 0i64);
            for i in 0..100_000u64 {
                if stop.load(Relaxed) {
                    break;
                }
                let key = format!("lone-{w}-{i}");
                if i % 4 == 3 {
                    attempted += 1;
                    match client.counter_add(b"lone-counter", 1).await {
                        Ok(_) => adds += 1,
                        Err(_) => break,
                    }
                } else {
                    match client.put(key.as_bytes(), key.as_bytes(), None).await {
                        Ok(_) => puts.push(key),
                        Err(_) => break,
                    }
                }
                acked.fetch_add(1, Relaxed);
            }
            (puts, adds, attempted)
        });
    }
    let start = Instant::now();
    while acked.load(Relaxed) < 2_000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "only {} writes acknowledged in 60 s",
            acked.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.kill(0);
    stop.store(true, Relaxed);
    let killed_at = start.elapsed();
    let (mut puts, mut adds, mut attempted) = (Vec::new(), 0, 0);
    while let Some(done) = tasks.join_next().await {
        let (p, a, t) = done.unwrap();
        puts.extend(p);
        adds += a;
        attempted += t;
    }
    println!(
        "killed after {:.2} s: {} puts and {adds} adds acknowledged",
        killed_at.as_secs_f64(),
        puts.len()
    );
    cluster.restart(0);
    let client = client_after_restart(cluster.addr(0), &tls).await;
    for key in &puts {
        let record = client.get(key.as_bytes()).await.unwrap();
        let values = match record.map(|r| r.value) {
            Some(Value::Register(values)) => values,
            other => panic!("{key}: acknowledged, then {other:?} after kill -9"),
        };
        assert_eq!(values, vec![key.as_bytes().to_vec()], "{key}");
    }
    let counter = client.counter(b"lone-counter").await.unwrap();
    assert!(
        (adds..=attempted).contains(&counter),
        "counter {counter}: {adds} adds acknowledged, {attempted} attempted"
    );
}

/// A client of a node that is starting again (its store replays its log).
async fn client_after_restart(addr: SocketAddr, tls: &TlsIdentity) -> Client {
    let client = client(addr, tls).await;
    eventually("the restarted node serves reads", || async {
        client.status().await.is_ok_and(|s| s.layout_version > 0)
    })
    .await;
    client
}

// ---------------------------------------------------------------------------
// 2. A saturating write load
//
// One client identity may hold 32 connections to a node, each with at most
// `client_streams_per_connection` requests at once (default 16): 512
// writes in flight, far below the 8192 queued writes at which a node
// refuses client writes. So node 1 (the one loaded) allows 1024 streams per
// connection. On a 2-core machine 64 KiB values make the ingest, not the
// disk, the bottleneck (queue peaks of 200-460 writes were measured with
// 384 to 9600 streams); small values fill the queue: 256-byte values from
// 24 000 streams reach the cap.

/// A write load against node 1.
struct Plan {
    /// In the figures and failures.
    name: &'static str,
    /// Node 1's config file.
    config: &'static str,
    /// W=1 connections and the requests each keeps in flight.
    w1: (usize, usize),
    /// W=2 connections and the requests each keeps in flight.
    w2: (usize, usize),
    value_bytes: usize,
}

/// How long the writers keep writing, and at most how many requests.
const SAT_LOAD: Duration = Duration::from_secs(10);
const SAT_CAP: u64 = 150_000;

fn sat_value(key: &str, bytes: usize) -> Vec<u8> {
    let mut value = key.as_bytes().to_vec();
    value.resize(bytes, b'.');
    value
}

/// Starts `n` nodes like `Cluster::start`, each reading `config`, logging
/// at info (gossipkv::node at debug) to `node-N/node.log`: the membership
/// events this test looks for, and dropped peer messages, are logged there.
fn logged_cluster(n: usize, config: &str) -> Cluster {
    use gossipkv::certs::{self, Role};
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    certs::init_ca(&ca, "test").unwrap();
    for (name, role) in [("client", Role::Client), ("admin", Role::Admin)] {
        certs::issue(&ca, name, role, 30, &dir.path().join(name)).unwrap();
    }
    let mut cluster = Cluster {
        nodes: Vec::new(),
        metrics: Vec::new(),
        http: Vec::new(),
        dir,
    };
    for i in 1..=n {
        let node_dir = cluster.path().join(format!("node-{i}"));
        certs::issue(
            &ca,
            &format!("node-{i}"),
            Role::Node,
            30,
            &node_dir.join("tls"),
        )
        .unwrap();
        let config_path = node_dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(node_dir.join("node.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let seed = cluster.nodes.first().map(|(_, a)| *a);
        let expect = if i == 1 { n } else { 1 };
        let mut command = serve_command(&node_dir, i, addr, metrics, seed);
        command
            .args(["--expect-nodes", &expect.to_string()])
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info,gossipkv::node=debug")
            .stderr(log);
        cluster.metrics.push(metrics);
        cluster.nodes.push((command.spawn().unwrap(), addr));
    }
    cluster
}

/// A node's log without terminal colours.
fn node_log(cluster: &Cluster, i: usize) -> String {
    let raw = std::fs::read_to_string(cluster.path().join(format!("node-{}/node.log", i + 1)))
        .unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[derive(Default)]
struct SatTally {
    acked: Vec<String>,
    ok: u64,
    overloaded: u64,
    quorum: u64,
    node_timeout: u64,
    unexpected: Vec<String>,
    max_latency: Duration,
}

impl SatTally {
    fn merge(&mut self, other: SatTally) {
        self.acked.extend(other.acked);
        self.ok += other.ok;
        self.overloaded += other.overloaded;
        self.quorum += other.quorum;
        self.node_timeout += other.node_timeout;
        self.unexpected.extend(other.unexpected);
        self.max_latency = self.max_latency.max(other.max_latency);
    }
}

/// What the samplers saw during the load.
#[derive(Default)]
struct Watch {
    samples_ok: [u64; 3],
    samples_failed: [u64; 3],
    suspicions: Vec<String>,
    peak_queued: [f64; 3],
    declared_down: [f64; 3],
}

/// One writer stream: fresh keys until the load's end or the cap.
async fn sat_stream(
    c: Arc<Client>,
    name: String,
    value_bytes: usize,
    issued: Arc<AtomicU64>,
    deadline: Instant,
) -> SatTally {
    let mut t = SatTally::default();
    for i in 0..SAT_CAP {
        if Instant::now() >= deadline || issued.fetch_add(1, Relaxed) >= SAT_CAP {
            break;
        }
        let key = format!("sat-{name}-{i:05}");
        let start = Instant::now();
        let result = c
            .put(key.as_bytes(), &sat_value(&key, value_bytes), None)
            .await;
        t.max_latency = t.max_latency.max(start.elapsed());
        match result {
            Ok(_) => {
                t.ok += 1;
                t.acked.push(key);
            }
            Err(ClientError::Node(Failure {
                code: ErrorCode::Overloaded,
                message,
            })) => {
                t.overloaded += 1;
                if !message.contains("writes waiting for the disk") {
                    t.unexpected.push(format!("{key}: Overloaded: {message}"));
                }
                // The pause the error asks for.
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
            Err(e) => t.unexpected.push(format!(
                "{key}: {e} (after {:.1} s)",
                start.elapsed().as_secs_f64()
            )),
        }
    }
    t
}

/// Samples `Request::ClusterMembers` on one node until `stop`.
async fn watch_members(
    node: usize,
    addr: SocketAddr,
    tls: TlsIdentity,
    stop: Arc<std::sync::atomic::AtomicBool>,
    watch: Arc<Mutex<Watch>>,
    began: Instant,
) {
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
                                "{:.1} s: node-{} sees {} {} (last heard {:?} ms ago)",
                                began.elapsed().as_secs_f64(),
                                node + 1,
                                m.name,
                                m.state,
                                m.last_heard_ms
                            );
                            w.suspicions.push(seen);
                        }
                    }
                }
                _ => w.samples_failed[node] += 1,
            }
        }
        // The sampling period.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (at most 60 s) until every node lists every acknowledged key,
/// then reads every 16th from every node; what is missing or wrong.
async fn sat_check_readable(
    cluster: &Cluster,
    tls: &TlsIdentity,
    acked: &[String],
    value_bytes: usize,
) -> Vec<String> {
    let mut problems = Vec::new();
    let wanted: BTreeSet<&str> = acked.iter().map(String::as_str).collect();
    for node in 0..cluster.nodes.len() {
        let c = client(cluster.addr(node), tls).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let missing = loop {
            let listed: BTreeSet<String> = match c
                .request(&Request::Keys {
                    prefix: b"sat-".to_vec(),
                    limit: u32::MAX,
                })
                .await
            {
                Ok(Response::Keys(keys)) => keys
                    .into_iter()
                    .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                    .collect(),
                _ => BTreeSet::new(),
            };
            let missing: Vec<&str> = wanted
                .iter()
                .filter(|k| !listed.contains(**k))
                .copied()
                .collect();
            if missing.is_empty() || Instant::now() > deadline {
                break missing;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        if !missing.is_empty() {
            problems.push(format!(
                "node-{} lacks {} of {} acknowledged keys after 60 s, e.g. {:?}",
                node + 1,
                missing.len(),
                acked.len(),
                &missing[..missing.len().min(10)]
            ));
        }
        let mut wrong = Vec::new();
        for key in acked.iter().step_by(16) {
            match c.get(key.as_bytes()).await {
                Ok(Some(r)) if r.value == Value::Register(vec![sat_value(key, value_bytes)]) => {}
                other => wrong.push(format!("{key}: {:?}", other.map(|r| r.map(|r| r.value)))),
            }
        }
        if !wrong.is_empty() {
            problems.push(format!(
                "node-{}: {} sampled acknowledged keys unreadable or wrong, e.g. {:?}",
                node + 1,
                wrong.len(),
                &wrong[..wrong.len().min(5)]
            ));
        }
    }
    problems
}

/// Drives `plan` against node 1 of a fresh 3-node cluster for SAT_LOAD
/// and checks: every request succeeds or fails with a clear code
/// (Overloaded, QuorumNotMet, Timeout) within the client's timeout, every
/// acknowledged write is readable on every node afterwards, no node
/// declares a member down (metric and log) and no member sample shows a
/// peer suspect or down. Prints the figures; panics with every failure.
async fn write_load(plan: Plan) {
    // Alone on the machine: another cluster's load would starve this one's
    // gossip for reasons of its own.
    let _slots = SLOTS.acquire_many(2).await.unwrap();
    let name = plan.name;
    let cluster = logged_cluster(3, plan.config);
    let tls = cluster.client_tls();
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(client(cluster.addr(i), &tls).await);
    }
    settled(&clients, 3).await;

    // Every connection first, then every stream at once.
    let mut connections = Vec::new();
    let groups = [(1u8, plan.w1.0, plan.w1.1), (2u8, plan.w2.0, plan.w2.1)];
    for (w, count, streams) in groups {
        for conn in 0..count {
            let mut c = client(cluster.addr(0), &tls).await;
            c.set_quorum(w, 1);
            connections.push((w, conn, streams, Arc::new(c)));
        }
    }
    // A fresh connection takes one request at first, one more per answer
    // (node/limits.rs): warm each one up to its full stream count with
    // reads of a missing key, as a long-lived client's would be, so that the load
    // measures the write path and not that ramp.
    let warm_up = Instant::now();
    let mut warming = Vec::new();
    for (_, _, streams, c) in &connections {
        for _ in 0..*streams {
            let c = c.clone();
            warming.push(tokio::spawn(async move { c.get(b"warm-up").await.is_ok() }));
        }
    }
    let mut warm = 0;
    for task in warming {
        warm += usize::from(task.await.unwrap());
    }
    println!(
        "{name}: {warm} reads warmed the connections up in {:.1} s",
        warm_up.elapsed().as_secs_f64()
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = Arc::new(Mutex::new(Watch::default()));
    let began = Instant::now();
    let mut watchers = Vec::new();
    for node in 0..3 {
        watchers.push(tokio::spawn(watch_members(
            node,
            cluster.addr(node),
            cluster.admin_tls(),
            stop.clone(),
            watch.clone(),
            began,
        )));
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
                // The sampling period.
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }

    let issued = Arc::new(AtomicU64::new(0));
    let deadline = began + SAT_LOAD;
    let mut tasks: Vec<(u8, tokio::task::JoinHandle<SatTally>)> = Vec::new();
    for (w, conn, streams, c) in &connections {
        for stream in 0..*streams {
            let name = format!("{name}-w{w}-{conn:02}-{stream:04}");
            let task = sat_stream(c.clone(), name, plan.value_bytes, issued.clone(), deadline);
            tasks.push((*w, tokio::spawn(task)));
        }
    }
    let mut by_w = [SatTally::default(), SatTally::default()];
    for (w, task) in tasks {
        // Each request is bounded by the client's timeout (10 s).
        let part = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a writer stream hung past its bounds")
            .unwrap();
        by_w[usize::from(w - 1)].merge(part);
    }
    let load_secs = began.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    for w in watchers {
        w.await.unwrap();
    }
    let w = std::mem::take(&mut *watch.lock().unwrap());

    let streams = plan.w1.0 * plan.w1.1 + plan.w2.0 * plan.w2.1;
    println!(
        "{name}: {streams} streams of {}-byte puts to node-1 for {load_secs:.1} s",
        plan.value_bytes
    );
    for (i, t) in by_w.iter().enumerate() {
        println!(
            "{name}: w={}: ok {}, overloaded {}, quorum not met {}, node timeout {}, other errors {}; max latency {:.2} s",
            i + 1,
            t.ok,
            t.overloaded,
            t.quorum,
            t.node_timeout,
            t.unexpected.len(),
            t.max_latency.as_secs_f64()
        );
    }
    let text = scrape(cluster.metrics[0]);
    let latency = |what: &str| {
        metric(
            &text,
            &format!("gossipkv_client_request_duration_seconds{what}"),
        )
        .unwrap_or(0.0)
    };
    println!(
        "{name}: node-1 request latency (admitted to answered): {} requests, mean {:.3} s, {} over 1 s",
        latency("_count"),
        latency("_sum") / latency("_count").max(1.0),
        latency("_count") - latency("_bucket{le=\"1\"}")
    );
    for node in 0..3 {
        let (commits, writes) = storage_figures(cluster.metrics[node]);
        println!(
            "{name}: node-{}: peak gossipkv_storage_queued_writes {}, {commits} commits, {writes} writes, {:.1} writes per commit; gossipkv_members_declared_down_total {}; member samples {} ok, {} failed",
            node + 1,
            w.peak_queued[node],
            writes / commits.max(1.0),
            w.declared_down[node],
            w.samples_ok[node],
            w.samples_failed[node]
        );
    }

    let mut failures = Vec::new();
    for t in &by_w {
        if !t.unexpected.is_empty() {
            failures.push(format!(
                "{} requests failed without a clear code, e.g. {:?}",
                t.unexpected.len(),
                &t.unexpected[..t.unexpected.len().min(5)]
            ));
        }
    }
    let acked: Vec<String> = by_w.iter().flat_map(|t| t.acked.iter().cloned()).collect();
    failures.extend(sat_check_readable(&cluster, &tls, &acked, plan.value_bytes).await);
    for node in 0..3 {
        let down = metric(
            &scrape(cluster.metrics[node]),
            "gossipkv_members_declared_down_total",
        )
        .unwrap_or(0.0)
        .max(w.declared_down[node]);
        if down != 0.0 {
            failures.push(format!(
                "node-{} declared {down} members down during the load",
                node + 1
            ));
        }
    }
    if !w.suspicions.is_empty() {
        failures.push(format!(
            "{} member samples showed a peer suspect or down: {:?}",
            w.suspicions.len(),
            &w.suspicions[..w.suspicions.len().min(12)]
        ));
    }
    for node in 0..3 {
        let log = node_log(&cluster, node);
        let events: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" is down") || l.contains("declared this node down"))
            .collect();
        let drops = log.matches("peer queue full").count();
        println!(
            "{name}: node-{}: {drops} peer messages dropped (peer queue full); membership events {events:?}",
            node + 1
        );
        if !events.is_empty() {
            failures.push(format!("node-{} logged {events:?}", node + 1));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: under the write load:\n{}",
        failures.join("\n")
    );
}

// The two write-load tests are load runs, not part of the default test run
// (run them with `cargo test --release --test write_path -- --ignored
// --nocapture`). They found, and now check the fixes of:
// - probes queued behind replication frames on one peer stream (now three
//   lanes per peer, `node/peers.rs`), and probes waiting behind a backlog
//   of calls in the core loop (now a membership channel served first);
// - W=1 writes unanswered for over 10 s under saturation (now a write
//   waits for the disk at most 5 s, and its quorum wait counts from its
//   arrival).
// What still fails now and then, on this 2-core machine shared with other
// work and always in a debug build: a probe misses its 500 ms window
// when the node processes are starved of CPU (a peer seen suspect "last
// heard 1,200 ms ago"), and the core loop's own anti-entropy writes wait
// behind a group commit. Both are in the issue 10 note.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load run: cargo test --release --test write_path -- --ignored"]
async fn a_saturating_write_load_is_refused_or_waits_and_no_member_is_suspected() {
    // See the note above `Plan`: 24 000 requests in flight on node 1 (1024
    // streams per connection allowed), small values, so the storage queue
    // reaches its cap; a few W=2 connections at the default stream count.
    write_load(Plan {
        name: "saturation",
        config: "[limits]\nclient_streams_per_connection = 1024\n",
        w1: (24, 1000),
        w2: (6, 16),
        value_bytes: 256,
    })
    .await;
}

/// The same checks at the default limits, with 64 KiB values: 480 writes
/// in flight (30 connections x 16 streams; a client certificate may hold
/// 32 connections to a node, and the test holds one more), far from the
/// queue's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load run: cargo test --release --test write_path -- --ignored"]
async fn a_heavy_write_load_at_the_default_limits_makes_no_member_suspect() {
    write_load(Plan {
        name: "default-limits",
        config: "",
        w1: (24, 16),
        w2: (6, 16),
        value_bytes: 64 * 1024,
    })
    .await;
}
