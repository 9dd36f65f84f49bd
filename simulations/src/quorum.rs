//! The `quorum` scenario: client calls through the nodes' coordinators at
//! W and R from 1 to 3, with a ledger of what each caller was told.
//!
//! Phase 1, no failure (duplication and reordering only): each write at W
//! is followed by a read at R with R + W > N on another node, whose own
//! disk is slow, which must see it; counters read back their exact sum.
//!
//! Phase 2, faults: message loss and duplication, cuts of one or two nodes,
//! crashes and restarts, with many calls in flight. Then heal, restart,
//! converge, and check against what callers were told:
//! - every call is answered exactly once, within the quorum timeout, unless
//!   its node crashed first;
//! - a write answered with success, or with `QuorumNotMet` after reaching a
//!   replica (it "is kept and spreads"), survives: set members are there,
//!   counters count it, and a register value is there unless another write
//!   to the key overlapped it;
//! - a write refused before it was made (`Unavailable`, `Overloaded`,
//!   `QuorumNotMet` with 0 reached, ...) appears nowhere, and nothing
//!   appears that was never written.

use crate::ledger::Ledger;
use crate::scenarios::{cluster, fail, settle, Outcome, Params, Report, ROUND};
use crate::sim::{NetConfig, Sim};
use gossipkv::client::{Call, ErrorCode, Request, Response};
use gossipkv::{NodeId, Value};
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What a write's answer says about whether it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Acknowledged, or held by at least one replica: must survive.
    Kept,
    /// Refused before it was made: must appear nowhere.
    Refused,
    /// Timed out, or never answered: either.
    Unknown,
}

fn fate(response: Option<&Response>) -> Fate {
    match response {
        None => Fate::Unknown,
        Some(Response::Error(failure)) => match failure.code {
            ErrorCode::QuorumNotMet { reached, .. } if reached > 0 => Fate::Kept,
            ErrorCode::Timeout | ErrorCode::Internal => Fate::Unknown,
            _ => Fate::Refused,
        },
        Some(_) => Fate::Kept,
    }
}

enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Add { key: Vec<u8>, amount: i64 },
    SetAdd { key: Vec<u8>, member: Vec<u8> },
    Read,
}

struct Issued {
    ticket: u64,
    node: NodeId,
    epoch: u64,
    at: Duration,
    op: Op,
}

fn call(request: Request, w: u8, r: u8) -> Call {
    Call { request, w, r }
}

/// Calls `node` and waits for the answer; `what` names the call in errors.
fn ask(sim: &mut Sim, node: NodeId, call: Call, what: &str) -> Result<Response, String> {
    let limit = sim.coordinator.quorum_timeout * 2;
    let ticket = sim
        .call(node, call)
        .ok_or_else(|| format!("node {node} is down for {what}"))?;
    sim.wait_reply(ticket, limit)
        .map(|reply| reply.response)
        .ok_or_else(|| format!("{what} on node {node} was not answered"))
}

/// Phase 1: reads at R after writes at W with R + W > N see the write.
fn read_your_writes(sim: &mut Sim, pairs: u64, report: &mut Report) -> Result<(), String> {
    const COMBOS: [(u8, u8); 6] = [(1, 3), (2, 2), (3, 1), (2, 3), (3, 2), (3, 3)];
    let mut sums: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
    let mut checked = 0u64;
    for i in 0..pairs {
        let (w, r) = COMBOS[i as usize % COMBOS.len()];
        let key = format!("ryw-{i:04}").into_bytes();
        // Mostly two different replicas of the key, each coordinating its
        // own call, so the read's quorum must meet the write's on other
        // nodes; sometimes any nodes (forwarding).
        let up = sim.up_nodes();
        let mut holders = Ledger::holders(sim, &key, &up);
        let replicas = holders.len();
        let (writer, reader) = if i % 4 != 3 && holders.len() >= 2 {
            let a = holders.remove(sim.rng().random_range(0..holders.len()));
            let b = holders[sim.rng().random_range(0..holders.len())];
            (a, b)
        } else {
            let a = up[sim.rng().random_range(0..up.len())];
            (a, up[sim.rng().random_range(0..up.len())])
        };
        let value = format!("ryw-value-{i}").into_bytes();
        // The reader's disk is slow: what it holds itself lags the write,
        // so only the quorums' intersection lets it see the write.
        sim.set_disk_ms(reader, Some((150, 250)));
        let put = Request::Put {
            key: key.clone(),
            value: value.clone(),
            context: None,
        };
        // A writer that must count its own copy (w = N, coordinating
        // itself) flushes slowly too: its answer must wait for that flush,
        // however soon the co-replicas acknowledge (W counts durable
        // copies).
        let slow_writer = usize::from(w) == replicas && i % 4 != 3 && writer != reader;
        if slow_writer {
            sim.set_disk_ms(writer, Some((150, 250)));
        }
        let ticket = sim
            .call(writer, call(put, w, 1))
            .ok_or_else(|| format!("node {writer} is down for a put"))?;
        let limit = sim.coordinator.quorum_timeout * 2;
        sim.run_until_condition(Duration::from_millis(1), limit, |s| {
            s.reply(ticket).is_some()
        })
        .ok_or_else(|| format!("a put at w={w} on node {writer} was not answered"))?;
        if slow_writer && sim.is_flushing_exposed(writer) {
            return Err(format!(
                "a put at w={w} on node {writer} was answered while its own commit was still flushing"
            ));
        }
        let response = sim
            .reply(ticket)
            .map(|reply| reply.response.clone())
            .ok_or("the answered put has no reply")?;
        if !matches!(response, Response::Context(_)) {
            return Err(format!(
                "a put at w={w} on node {writer} failed with no fault: {response:?}"
            ));
        }
        let get = Request::Get { key: key.clone() };
        let response = ask(sim, reader, call(get, 1, r), &format!("a get at r={r}"))?;
        let seen = match &response {
            Response::Record(Some(record)) => match &record.value {
                Value::Register(values) => values.contains(&value),
                _ => false,
            },
            _ => false,
        };
        if !seen {
            return Err(format!(
                "a get at r={r} on node {reader} after a put at w={w} on node {writer} did not see it: {response:?}"
            ));
        }
        // A counter written at W and read at R counts every add so far.
        let counter = format!("ryw-counter-{}", i % 4).into_bytes();
        let amount = i as i64 % 5 + 1;
        let add = Request::CounterAdd {
            key: counter.clone(),
            amount,
        };
        let response = ask(
            sim,
            writer,
            call(add, w, 1),
            &format!("a counter add at w={w}"),
        )?;
        if !matches!(response, Response::Counter(_)) {
            return Err(format!(
                "a counter add at w={w} failed with no fault: {response:?}"
            ));
        }
        let sum = sums.entry(counter.clone()).or_default();
        *sum += amount;
        let get = call(Request::CounterGet { key: counter }, 1, r);
        let response = ask(sim, reader, get, &format!("a counter get at r={r}"))?;
        if !matches!(response, Response::Counter(n) if n == *sum) {
            return Err(format!(
                "a counter get at r={r} after adds at w={w} read {response:?}, the adds sum to {sum}"
            ));
        }
        checked += 2;
        sim.set_disk_ms(reader, None);
        sim.set_disk_ms(writer, None);
    }
    report.metric("reads_after_quorum_writes_checked", checked as f64, "reads");
    Ok(())
}

pub fn quorum(params: &Params) -> Outcome {
    let n = params.nodes.unwrap_or(5).max(3);
    let keys = params.keys.unwrap_or(120).max(12);
    let mut sim = cluster(params, n)?;
    let mut report = Report::default();
    // Wide delays: a read's fetches often overtake the write's replication,
    // so a quorum counted short shows; many duplicates: an acknowledgement
    // or answer counted twice shows.
    sim.net = NetConfig {
        duplicate: 0.25,
        delay_ms: (1, 30),
        ..NetConfig::default()
    };
    read_your_writes(&mut sim, (keys / 2).max(30), &mut report).map_err(fail)?;

    sim.net = NetConfig {
        loss: 0.05,
        duplicate: 0.05,
        delay_ms: (1, 40),
        disk_ms: (1, 8),
    };
    let timeout = sim.coordinator.quorum_timeout;
    // A call is answered within the timeout plus the last message's delay.
    let slack = Duration::from_millis(100);
    let step = Duration::from_millis(100);
    let steps = (keys * 2).max(60);
    let per_step = 6;
    let mut issued: Vec<Issued> = Vec::new();
    let mut crashed: Vec<NodeId> = Vec::new();
    let mut cut = false;
    let (mut next_member, mut next_value) = (0u64, 0u64);
    let counters = 6u64;
    for s in 0..steps {
        for _ in 0..per_step {
            let up = sim.up_nodes();
            let node = up[sim.rng().random_range(0..up.len())];
            let w = sim.rng().random_range(1..=3u8);
            let r = sim.rng().random_range(1..=3u8);
            let (request, op) = match sim.rng().random_range(0..10) {
                0..=3 => {
                    let key = format!("key-{:04}", sim.rng().random_range(0..keys)).into_bytes();
                    next_value += 1;
                    let value = format!("v{next_value}").into_bytes();
                    let request = Request::Put {
                        key: key.clone(),
                        value: value.clone(),
                        context: None,
                    };
                    (request, Op::Put { key, value })
                }
                4..=5 => {
                    let key =
                        format!("counter-{}", sim.rng().random_range(0..counters)).into_bytes();
                    let amount = sim.rng().random_range(1..=3);
                    let request = Request::CounterAdd {
                        key: key.clone(),
                        amount,
                    };
                    (request, Op::Add { key, amount })
                }
                6..=7 => {
                    let key = format!("set-{}", sim.rng().random_range(0..counters)).into_bytes();
                    next_member += 1;
                    let member = format!("m{next_member}").into_bytes();
                    let request = Request::SetAdd {
                        key: key.clone(),
                        member: member.clone(),
                    };
                    (request, Op::SetAdd { key, member })
                }
                _ => {
                    let key = format!("key-{:04}", sim.rng().random_range(0..keys)).into_bytes();
                    (Request::Get { key }, Op::Read)
                }
            };
            let epoch = sim.epoch(node);
            let at = sim.now;
            if let Some(ticket) = sim.call(node, call(request, w, r)) {
                issued.push(Issued {
                    ticket,
                    node,
                    epoch,
                    at,
                    op,
                });
            }
        }
        // A fault every few steps: cut one or two nodes off, crash one,
        // or bring everything back.
        if s % 8 == 7 {
            match sim.rng().random_range(0..4) {
                0 if !cut => {
                    let up = sim.up_nodes();
                    let k = sim.rng().random_range(1..=2usize.min(up.len() - 1));
                    let (a, b) = up.split_at(k);
                    sim.split(a, b);
                    cut = true;
                }
                1 if crashed.len() < 2 => {
                    let up = sim.up_nodes();
                    let victim = up[sim.rng().random_range(0..up.len())];
                    // While it flushes writes it already sent (a slow
                    // flush): half the time once they reached the other
                    // replicas (the crash may lose what those hold), half
                    // the time before (an answer given before the flush
                    // would then name a write nobody holds).
                    let after_delivery = sim.rng().random_bool(0.5);
                    sim.set_disk_ms(victim, Some((80, 120)));
                    for _ in 0..200 {
                        if sim.is_flushing_exposed(victim) {
                            if after_delivery {
                                sim.run_for(Duration::from_millis(45));
                            }
                            break;
                        }
                        sim.run_for(Duration::from_millis(1));
                    }
                    sim.crash(victim);
                    sim.set_disk_ms(victim, None);
                    crashed.push(victim);
                }
                _ => {
                    sim.heal();
                    cut = false;
                    for id in crashed.drain(..) {
                        sim.restart(id);
                    }
                }
            }
        }
        sim.run_for(step);
        check_answered(&sim, &issued, timeout + slack)?;
    }
    sim.heal();
    for id in crashed.drain(..) {
        sim.restart(id);
    }
    sim.net = NetConfig::default();
    // Every node writes every key once more, so that a node restarted
    // after a crash lost writes it had sent writes in those partitions
    // again: were a lost dot issued again, its holders would diverge.
    for node in sim.up_nodes() {
        for k in 0..keys {
            let key = format!("key-{k:04}").into_bytes();
            next_value += 1;
            let value = format!("v{next_value}").into_bytes();
            let request = Request::Put {
                key: key.clone(),
                value: value.clone(),
                context: None,
            };
            let (epoch, at) = (sim.epoch(node), sim.now);
            if let Some(ticket) = sim.call(node, call(request, 1, 1)) {
                issued.push(Issued {
                    ticket,
                    node,
                    epoch,
                    at,
                    op: Op::Put { key, value },
                });
            }
        }
        sim.run_for(Duration::from_millis(50));
    }
    sim.run_for(timeout + slack);
    check_answered(&sim, &issued, timeout + slack)?;
    if let Some(ticket) = sim.answered_twice.first() {
        return Err(fail(format!("call {ticket} was answered twice")));
    }
    let took = settle(&mut sim, Duration::from_secs(600), "quorum (after heal)")?;
    check_ledger(&sim, &issued)?;

    let mut fates = [0u64; 3];
    for i in issued.iter().filter(|i| !matches!(i.op, Op::Read)) {
        let f = fate(sim.reply(i.ticket).map(|r| &r.response));
        fates[f as usize] += 1;
    }
    report.metric("calls", issued.len() as f64, "calls");
    report.metric("writes_kept", fates[Fate::Kept as usize] as f64, "writes");
    report.metric(
        "writes_refused",
        fates[Fate::Refused as usize] as f64,
        "writes",
    );
    report.metric(
        "writes_unknown",
        fates[Fate::Unknown as usize] as f64,
        "writes",
    );
    report.metric(
        "crashes_that_lost_a_flush",
        sim.flushes_lost as f64,
        "crashes",
    );
    report.metric(
        "rounds_to_converge_after_heal",
        took.as_secs_f64() / ROUND.as_secs_f64(),
        "rounds",
    );
    Ok(report)
}

/// Every call whose time is up was answered in time, unless its node
/// crashed since it was issued.
fn check_answered(
    sim: &Sim,
    issued: &[Issued],
    within: Duration,
) -> Result<(), crate::scenarios::Violation> {
    for i in issued {
        match sim.reply(i.ticket) {
            Some(reply) if reply.at > i.at + within => {
                return Err(fail(format!(
                    "call {} on node {} was answered after {:?}, beyond the {within:?} bound",
                    i.ticket,
                    i.node,
                    reply.at - i.at
                )))
            }
            None if sim.now > i.at + within && sim.epoch(i.node) == i.epoch => {
                return Err(fail(format!(
                    "call {} on node {} was never answered, and the node did not crash",
                    i.ticket, i.node
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Set members, borrowed from the calls.
type Members<'a> = BTreeSet<&'a [u8]>;

fn check_ledger(sim: &Sim, issued: &[Issued]) -> Result<(), crate::scenarios::Violation> {
    let fate_of = |i: &Issued| fate(sim.reply(i.ticket).map(|r| &r.response));
    let answered_at = |i: &Issued| sim.reply(i.ticket).map(|r| r.at);
    let up = sim.up_nodes();
    let holders = |key: &[u8]| Ledger::holders(sim, key, &up);
    // Registers: by key, the writes in the order issued.
    let mut puts: BTreeMap<&[u8], Vec<&Issued>> = BTreeMap::new();
    // Counters: what must be counted, and what may be.
    let mut sums: BTreeMap<&[u8], (i64, i64)> = BTreeMap::new();
    // Sets: members that must be there, and those that may.
    let mut members: BTreeMap<&[u8], (Members, Members)> = BTreeMap::new();
    for i in issued {
        let f = fate_of(i);
        match &i.op {
            Op::Put { key, .. } => puts.entry(key).or_default().push(i),
            Op::Add { key, amount } => {
                let (must, may) = sums.entry(key).or_default();
                match f {
                    Fate::Kept => {
                        *must += amount;
                        *may += amount;
                    }
                    Fate::Unknown => *may += amount,
                    Fate::Refused => {}
                }
            }
            Op::SetAdd { key, member } => {
                let (must, may) = members.entry(key).or_default();
                match f {
                    Fate::Kept => {
                        must.insert(member);
                        may.insert(member);
                    }
                    Fate::Unknown => {
                        may.insert(member);
                    }
                    Fate::Refused => {}
                }
            }
            Op::Read => {}
        }
    }
    for (key, (must, may)) in &sums {
        for n in holders(key) {
            let got = sim.store(n).and_then(|s| s.counter(key).ok()).unwrap_or(0);
            if got < *must || got > *may {
                return Err(fail(format!(
                    "node {n} counts {got} for {}: the kept adds sum to {must}, with the unknown ones {may}",
                    String::from_utf8_lossy(key)
                )));
            }
        }
    }
    for (key, (must, may)) in &members {
        for n in holders(key) {
            let got: BTreeSet<Vec<u8>> = sim
                .store(n)
                .and_then(|s| s.set_members(key).ok())
                .unwrap_or_default()
                .into_iter()
                .collect();
            if let Some(lost) = must.iter().find(|m| !got.contains(**m)) {
                return Err(fail(format!(
                    "node {n} lacks member {} of {}, which a caller was told is kept",
                    String::from_utf8_lossy(lost),
                    String::from_utf8_lossy(key)
                )));
            }
            if let Some(extra) = got.iter().find(|m| !may.contains(m.as_slice())) {
                return Err(fail(format!(
                    "node {n} holds member {} of {}, which was refused or never written",
                    String::from_utf8_lossy(extra),
                    String::from_utf8_lossy(key)
                )));
            }
        }
    }
    for (key, writes) in &puts {
        let allowed: BTreeSet<&[u8]> = writes
            .iter()
            .filter(|i| fate_of(i) != Fate::Refused)
            .filter_map(|i| match &i.op {
                Op::Put { value, .. } => Some(value.as_slice()),
                _ => None,
            })
            .collect();
        // A kept write no other write to the key overlapped: every other
        // was issued before it and answered before it was issued.
        let must: Vec<&[u8]> = writes
            .iter()
            .filter(|i| fate_of(i) == Fate::Kept)
            .filter(|i| {
                writes.iter().all(|o| {
                    o.ticket == i.ticket
                        || (o.at < i.at && answered_at(o).is_some_and(|a| a < i.at))
                })
            })
            .filter_map(|i| match &i.op {
                Op::Put { value, .. } => Some(value.as_slice()),
                _ => None,
            })
            .collect();
        for n in holders(key) {
            let got = match sim.store(n).and_then(|s| s.get(key).ok()).flatten() {
                Some(record) => match record.value {
                    Value::Register(values) => values,
                    other => {
                        return Err(fail(format!(
                            "node {n} holds {other:?} for register {}",
                            String::from_utf8_lossy(key)
                        )))
                    }
                },
                None => Vec::new(),
            };
            if let Some(lost) = must.iter().find(|v| !got.iter().any(|g| g == *v)) {
                return Err(fail(format!(
                    "node {n} lost {} of {} (holds {:?}), which a caller was told is kept",
                    String::from_utf8_lossy(lost),
                    String::from_utf8_lossy(key),
                    got.iter()
                        .map(|g| String::from_utf8_lossy(g))
                        .collect::<Vec<_>>()
                )));
            }
            if let Some(extra) = got.iter().find(|g| !allowed.contains(g.as_slice())) {
                return Err(fail(format!(
                    "node {n} holds {} for {}, which was refused or never written",
                    String::from_utf8_lossy(extra),
                    String::from_utf8_lossy(key)
                )));
            }
        }
    }
    // Equal vectors are not enough: two writes under one dot (a dot
    // issued again after a crash lost it) leave holders whose vectors
    // agree and whose values do not. Every holder of a key holds the same.
    let keys = puts.keys().chain(sums.keys()).chain(members.keys());
    for key in keys {
        let mut seen: Option<(NodeId, Option<gossipkv::crdt::Record>)> = None;
        for n in holders(key) {
            let record = sim.store(n).and_then(|s| s.get(key).ok()).flatten();
            match &seen {
                None => seen = Some((n, record)),
                Some((first, held)) if *held != record => {
                    return Err(fail(format!(
                        "nodes {first} and {n} hold different states of {} after converging: {held:?} and {record:?}",
                        String::from_utf8_lossy(key)
                    )))
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}
